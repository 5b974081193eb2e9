"""Pre-staging (issue 15): agents that hold the GGUF write their rpc-servers' tensor cache entries
before the coordinator starts. Real agents, real rpc-servers with `-c`, real llama-server.

Two agents capped at 260 and 300 MiB: gemma needs both, and the one with more room (agent 1)
goes last, so it holds the output layer, a second copy of the tied token embeddings: its only
tensor above llama.cpp's 10 MiB hash threshold, and the only cache entry a load writes."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path
from typing import Any

import grpc
import ollama
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.node_auth import make_proof
from llamafleet.controller.credentials import STAGE_METHOD, STATUS_METHOD
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import RunningAgent, wait_for
from tests.integration.controller.harness import Fleet, running_fleet

# What pre-staging is for: a coordinator here, loading onto holders over RPC (a coordinator on the
# holder itself reads its share from its own file, and needs no staging).
PINNED = ("--coordinator", "controller")
pytestmark = pytest.mark.integration
LIMITS = ("260MiB", "300MiB")
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 16}
PROMPT = "The capital of France is a city where"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def raw_tokens(fleet: Fleet) -> str:
    reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt=PROMPT, raw=True, options=GREEDY)
    assert reply.eval_count == GREEDY["num_predict"] and reply.response is not None
    return reply.response


def cache_dir(agent: RunningAgent) -> Path:
    return agent.state_dir.parent / "cache" / "rpc"  # the harness's --cache-dir, /rpc as rpc-server -c uses it


def entries(agent: RunningAgent) -> dict[str, Path]:
    root = cache_dir(agent)
    return {p.name: p for p in sorted(root.iterdir())} if root.exists() else {}


def events(fleet: Fleet, kind: str) -> list[dict[str, Any]]:
    result = fleet.cli("events", "--json", "--limit", "500")
    assert result.returncode == 0, result.stderr
    return [e for e in json.loads(result.stdout) if e["kind"] == kind]


def saved_lines(agent: RunningAgent) -> list[str]:
    """rpc-server prints `saved to '<entry>'` each time it writes a cache entry itself."""
    return [line for line in agent.rpc().recent_output if "saved to" in line]


def holders_confirmed(fleet: Fleet) -> None:
    def planned() -> bool:
        result = fleet.cli("plan", "gemma", "--json")
        assert result.returncode == 0, result.stderr
        return bool(json.loads(result.stdout)["holders"])  # the controller hashes its own copy first

    wait_for(planned, 60, "the holder confirmed by sha256", interval_s=0.5)


def store_with_gemma(root: Path, model: Path) -> tuple[str, ...]:
    root.mkdir()
    (root / "gemma.gguf").symlink_to(model)
    return ("--models-dir", str(root))


def test_staged_entries_are_what_rpc_server_writes_and_the_tokens_match(tmp_path: Path, llama_cpp: Manifest,
                                                                        stock_llama_cpp: Manifest,
                                                                        test_model: Path) -> None:
    # Stock rpc-servers: the agents copy the bytes (patched ones get references, test_patched_load.py).
    # 1. Nobody holds the file: a load over the network, as before; rpc-server writes its entries.
    with running_fleet(tmp_path / "network", llama_cpp, test_model, memory_limit=LIMITS,
                       agent_llama_cpp=stock_llama_cpp) as fleet:
        over_network = raw_tokens(fleet)
        [loaded] = fleet.ps()
        assert loaded["prestaged_bytes"] == 0 and loaded["assignments"][-1]["node"] == fleet.agents[1].address
        written = entries(fleet.agents[1])
        assert len(written) == 1 and saved_lines(fleet.agents[1])
        assert entries(fleet.agents[0]) == {}  # its layers' tensors are all under 10 MiB
        assert events(fleet, "stage") == [] and events(fleet, "stage.failed") == []

    # 2. Agent 1 holds the file, agent 0 does not: agent 1 stages, agent 0 gets its bytes as before.
    holder_args = store_with_gemma(tmp_path / "store", test_model)
    # The coordinator stays on the controller's host: these are loads over RPC onto a holder.
    with running_fleet(tmp_path / "staged", llama_cpp, test_model, memory_limit=LIMITS, controller_args=PINNED,
                       agent_args=((), holder_args), agent_llama_cpp=stock_llama_cpp) as fleet:
        holder, other = fleet.agents[1], fleet.agents[0]
        holders_confirmed(fleet)
        assert entries(holder) == {}
        staged = raw_tokens(fleet)
        assert staged == over_network and staged.strip()

        # Same names, same bytes as rpc-server wrote itself; and during the load it wrote nothing.
        after = entries(holder)
        assert list(after) == list(written)
        assert all(filecmp.cmp(written[name], after[name], shallow=False) for name in written)
        assert saved_lines(holder) == []
        assert [line for line in holder.log().splitlines() if "saved to" in line] == []

        size = written[next(iter(written))].stat().st_size
        [loaded] = fleet.ps()
        assert loaded["prestaged_bytes"] == size
        assert list(loaded["prestage"]["nodes"]) == [holder.address]  # no call to the node without the file
        [event] = events(fleet, "stage")
        assert event["subject"] == holder.address
        assert (event["data"]["staged"], event["data"]["bytes_written"], event["data"]["present"]) == (1, size, 0)
        assert events(fleet, "stage.failed") == []

        # The RPC is authenticated like every other one: a proof made for StageTensors passes, one
        # made for another method does not.
        request = pb.StageTensorsRequest(sha256=GEMMA_SHA256, ranges=[pb.ByteRange(offset=0, size=size)])
        reply = holder.stub.StageTensors(request, metadata=[("authorization", make_proof(holder.token, STAGE_METHOD))],
                                         timeout=60)
        assert reply.staged == 1 and reply.entries[0] not in written  # another range, another entry
        with pytest.raises(grpc.RpcError) as refused:
            holder.stub.StageTensors(request, metadata=[("authorization", make_proof(holder.token, STATUS_METHOD))],
                                     timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A node without the file says so in one line.
        with pytest.raises(grpc.RpcError) as without:
            other.stub.StageTensors(request, metadata=other.metadata, timeout=10)
        assert without.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no models dir" in (without.value.details() or "")
        past_end = pb.StageTensorsRequest(sha256=GEMMA_SHA256, ranges=[pb.ByteRange(offset=test_model.stat().st_size,
                                                                                    size=1)])
        with pytest.raises(grpc.RpcError) as bad:
            holder.stub.StageTensors(past_end, metadata=holder.metadata, timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "runs past the end" in (bad.value.details() or "")


def test_a_truncated_entry_is_rewritten_by_the_next_staging(tmp_path: Path, llama_cpp: Manifest,
                                                           stock_llama_cpp: Manifest, test_model: Path) -> None:
    header = read_gguf_header(test_model)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    with test_model.open("rb") as handle:
        handle.seek(header.data_offset + embd.offset)
        expected = handle.read(embd.n_bytes)
    holder_args = store_with_gemma(tmp_path / "store", test_model)
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, memory_limit=LIMITS, controller_args=PINNED,
                       agent_args=((), holder_args), agent_llama_cpp=stock_llama_cpp) as fleet:
        holder = fleet.agents[1]
        holders_confirmed(fleet)
        first = raw_tokens(fleet)
        [entry] = entries(holder).values()
        assert entry.read_bytes() == expected  # the tensor's bytes as they lie in the GGUF
        # What a crashed write leaves behind; rpc-server itself would serve it as the tensor.
        with entry.open("r+b") as handle:
            handle.truncate(embd.n_bytes // 2)
        result = fleet.cli("stop", "gemma")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: fleet.ps() == [], 30, "gemma unloaded")

        again = raw_tokens(fleet)
        assert again == first
        assert entry.stat().st_size == embd.n_bytes and entry.read_bytes() == expected
        last = events(fleet, "stage")[-1]["data"]
        assert (last["staged"], last["rewritten"], last["present"]) == (1, 1, 0)
        assert saved_lines(holder) == []
