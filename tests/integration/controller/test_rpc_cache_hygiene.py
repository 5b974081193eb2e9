"""Cache hygiene with a real fleet (issue 15): a corrupted rpc cache entry is replaced before a
load can serve it and the answer stays the same; the running coordinator's entry is never
evicted; `llamafleet-agent cache gc` works beside the running agent.

The same two agents as test_prestage.py: agent 1 holds gemma and stages its one entry above the
10 MiB threshold (the output layer's copy of the tied token embeddings)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import AGENT, RunningAgent, wait_for
from tests.integration.controller.harness import Fleet, running_fleet
from tests.integration.controller.test_prestage import (
    GEMMA_SHA256,
    LIMITS,
    entries,
    events,
    holders_confirmed,
    raw_tokens,
    saved_lines,
    store_with_gemma,
)

pytestmark = pytest.mark.integration


def corrupt(entry: Path, age_s: float = 0.0) -> None:
    """Flip every bit of 4 KiB in the middle (the size stays): what a bad disk or a stray write leaves."""
    size = entry.stat().st_size
    with entry.open("r+b") as handle:
        handle.seek(size // 2)
        chunk = handle.read(4096)
        handle.seek(size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    if age_s:
        os.utime(entry, (time.time() - age_s, time.time() - age_s))


def reload(fleet: Fleet) -> str:
    result = fleet.cli("stop", "gemma")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: fleet.ps() == [], 30, "gemma unloaded")
    return raw_tokens(fleet)


def cache_summary(agent: RunningAgent) -> pb.RpcCacheSummary:
    return agent.status().rpc_cache


def cache_cli(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, "cache", *args, "--state-dir", str(agent.state_dir),
                           "--cache-dir", str(agent.state_dir.parent / "cache")],
                          capture_output=True, text=True, timeout=60)


def test_a_corrupted_entry_is_replaced_and_the_answer_is_the_same(tmp_path: Path, llama_cpp: Manifest,
                                                                  stock_llama_cpp: Manifest, test_model: Path) -> None:
    # Stock rpc-servers, so that the agent stages copies (patched ones get references, which
    # hold no bytes to corrupt: test_patched_load.py).
    header = read_gguf_header(test_model)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    with test_model.open("rb") as handle:
        handle.seek(header.data_offset + embd.offset)
        expected = handle.read(embd.n_bytes)
    holder_args = store_with_gemma(tmp_path / "store", test_model)
    # The coordinator stays here, so that the holder's share is staged into its rpc cache (a
    # coordinator on the holder would read its share from the file, and stage nothing).
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, memory_limit=LIMITS,
                       agent_args=((), holder_args), agent_llama_cpp=stock_llama_cpp,
                       controller_args=("--coordinator", "controller")) as fleet:
        holder = fleet.agents[1]
        holders_confirmed(fleet)
        first = raw_tokens(fleet)
        [entry] = entries(holder).values()
        assert entry.read_bytes() == expected

        # The keeper's pass after the staging: the entry is verified and in use by rpc-server #0.
        summary = wait_for(lambda: (s := cache_summary(holder)).models == 1 and bool(s.checked_at_unix_ms) and s, 30,
                           "the keeper's pass after the staging")
        assert (summary.entries, summary.used_bytes, summary.in_use_bytes, summary.unverified) == (
            1, embd.n_bytes, embd.n_bytes, 0)
        assert summary.max_bytes > 0  # the default cap: half of the cache's filesystem
        node = fleet.node(holder.address)
        assert node["rpc_cache"]["entries"] == 1 and node["rpc_cache"]["in_use_bytes"] == embd.n_bytes
        shown = fleet.cli("nodes")
        assert shown.returncode == 0 and "rpc cache 170.0 MiB of" in shown.stdout, shown.stdout
        token = tmp_path / "holder.token"
        token.write_text(holder.token)
        status = subprocess.run([AGENT, "status", "--address", holder.address, "--token-file", str(token)],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "\nrpc cache   170.0 MiB of" in status.stdout, status.stderr

        # 1. Corrupted in place (same size): the next staging hashes it, finds it bad, rewrites it.
        corrupt(entry)
        assert reload(fleet) == first
        assert entry.read_bytes() == expected
        last = events(fleet, "stage")[-1]["data"]
        assert (last["staged"], last["rewritten"], last["present"]) == (1, 1, 0)
        assert saved_lines(holder) == []  # rpc-server was sent nothing and served the good entry
        wait_for(lambda: cache_summary(holder).corrupt_removed == 1, 30, "the rewrite counted")

        # 2. The command line beside the running agent: the entry of the model rpc-server #0 still
        # serves is not evicted, even under a cap of one byte...
        capped = cache_cli(holder, "gc", "--max", "1")
        assert capped.returncode == 1 and "in use by running coordinators" in capped.stderr, capped.stderr
        assert entry.read_bytes() == expected
        listed = json.loads(cache_cli(holder, "ls", "--json").stdout)
        [model] = listed["models"]
        assert (model["name"], model["in_use"], model["rpc_server_indexes"], model["verified"]) == (
            "gemma", True, [0], 1)

        # ...but a corrupted one is removed, and the next load's staging writes it again.
        corrupt(entry, age_s=60)
        cleaned = cache_cli(holder, "gc")
        assert cleaned.returncode == 0, cleaned.stderr
        assert f"removed {entry.name} (170.0 MiB): corrupted" in cleaned.stdout and not entry.exists()
        assert reload(fleet) == first
        assert entry.read_bytes() == expected
        last = events(fleet, "stage")[-1]["data"]
        assert (last["staged"], last["rewritten"], last["present"]) == (1, 0, 0)
        wait_for(lambda: cache_summary(holder).corrupt_removed == 2, 30, "the removal by the command line counted")

        # A slot the agent does not have is refused in one line, before any file work.
        beyond = pb.StageTensorsRequest(sha256=GEMMA_SHA256, ranges=[pb.ByteRange(offset=0, size=embd.n_bytes)],
                                        rpc_server_index=99)
        with pytest.raises(grpc.RpcError) as refused:
            holder.stub.StageTensors(beyond, metadata=holder.metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "no rpc-server #99: this agent runs at most 4 (--max-rpc-servers 4 × 1 per slot)"
