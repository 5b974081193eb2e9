"""`llamafleet pull` (issue 15): a real controller streams the real gemma file into real agents'
models dirs over their authenticated gRPC channel; resumes after real interruptions; verified."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.units import format_size
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import RunningAgent, wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
RATE = "40MiB"  # gemma's 253 MB then take six seconds: time to interrupt a pull for real


def events(fleet: Fleet, kind: str) -> list[dict[str, Any]]:
    result = fleet.cli("events", "--json", "--limit", "1000")
    assert result.returncode == 0, result.stderr
    return [e for e in json.loads(result.stdout) if e["kind"] == kind]


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*"))


def ready_models(agent: RunningAgent) -> list[tuple[str, str]]:
    return [(m.name, m.sha256) for m in agent.status().models if m.state == pb.MODEL_FILE_STATE_READY]


def partial_size(store: Path) -> int:
    partial = store / ".gemma.gguf.partial"
    return partial.stat().st_size if partial.exists() else 0


def settled_size(store: Path) -> int:
    """The partial's size once it stopped growing: the transfer really ended."""
    def unchanged() -> int | None:
        before = partial_size(store)
        time.sleep(0.5)
        return before if partial_size(store) == before else None

    return wait_for(unchanged, 15, "the partial to stop growing")


def post(fleet: Fleet, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(fleet.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, [json.loads(line) for line in reply.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_pull_makes_the_node_hold_a_byte_identical_ready_file_and_stages_it(tmp_path: Path, llama_cpp: Manifest,
                                                                              stock_llama_cpp: Manifest,
                                                                              test_model: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    # Stock rpc-servers: the staging after the pull copies the bytes, which this test compares
    # (patched ones get references to the file, as test_patched_load.py shows for a load).
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, memory_limit="900MiB",
                       agent_args=(("--models-dir", str(store)), ()), agent_llama_cpp=stock_llama_cpp) as fleet:
        receiver, bare = fleet.agents
        wait_for(lambda: fleet.node(receiver.address)["models_dir"], 10, "the node's models dir reported")

        # Default targets: only the node with a models dir (the other cannot keep a file).
        result = fleet.cli("pull", "gemma")
        assert result.returncode == 0, result.stderr
        size = format_size(test_model.stat().st_size)
        assert f"{receiver.address}: pulled gemma:latest as gemma ({size} sent in " in result.stdout
        assert "sha256 verified" in result.stdout and bare.address not in result.stdout
        assert f"{receiver.address}: pulling" in result.stderr  # progress, on stderr
        assert filecmp.cmp(store / "gemma.gguf", test_model, shallow=False)
        assert hidden(store) == []
        # READY at once: the agent verified it as it arrived, and does not read it again.
        assert ready_models(receiver) == [("gemma", GEMMA_SHA256)]

        def holder() -> list[str]:
            plan = fleet.cli("plan", "gemma", "--json")
            assert plan.returncode == 0, plan.stderr
            return json.loads(plan.stdout)["holders"]

        assert wait_for(holder, 30, "the controller to see the node as a holder", interval_s=0.3) == [receiver.address]
        [listed] = json.loads(fleet.cli("models", "--json").stdout)
        assert (listed["model"], listed["sha256"], listed["holders"]) == ("gemma:latest", GEMMA_SHA256,
                                                                         [receiver.address])
        assert receiver.address in fleet.cli("models").stdout
        assert f"model gemma ({size}, sha256 a5fd3b62230a)" in fleet.cli("nodes").stdout

        [started] = events(fleet, "pull")
        [done] = events(fleet, "pull.done")
        assert started["subject"] == done["subject"] == receiver.address
        assert (done["data"]["sent_bytes"], done["data"]["resumed_from"], done["data"]["held"]) == (
            test_model.stat().st_size, 0, False)

        # In the background the node stages the model's large tensors: gemma has one, the token
        # embeddings, which a placement puts on the output device a second time.
        staged = wait_for(lambda: [e for e in events(fleet, "stage") if e["data"].get("after_pull")], 60,
                          "the staging after the pull")
        assert staged[0]["subject"] == receiver.address
        assert (staged[0]["data"]["staged"], staged[0]["data"]["referenced"]) == (1, 0)
        header = read_gguf_header(test_model)
        embd = next(t for t in header.tensors if t.name == "token_embd.weight")
        [entry] = (receiver.state_dir.parent / "cache" / "rpc").iterdir()
        with test_model.open("rb") as handle:
            handle.seek(header.data_offset + embd.offset)
            assert entry.read_bytes() == handle.read(embd.n_bytes)
        assert events(fleet, "stage.failed") == []

        # Nothing left to do, said so; held already when named: nothing sent.
        again = fleet.cli("pull", "gemma")
        assert again.returncode == 0 and "nothing to do: 1 node(s) with a models dir hold gemma:latest already" in \
            again.stdout, again.stderr
        named = fleet.cli("pull", "gemma", "--node", receiver.address, "--json")
        assert named.returncode == 0, named.stderr
        [part] = json.loads(named.stdout)["nodes"]
        assert (part["status"], part["sent_bytes"]) == ("held", 0)

        # Refusals: one line each, the right exit code, nothing sent.
        no_dir = fleet.cli("pull", "gemma", "--node", bare.address)
        assert no_dir.returncode == 1 and no_dir.stderr.startswith("error: ") and "has no models dir" in no_dir.stderr
        assert post(fleet, "/llamafleet/v1/pull", {"model": "gemma", "nodes": [bare.address]})[0] == 409
        unknown = fleet.cli("pull", "gemma", "--node", "10.9.9.9:1")
        assert unknown.returncode == 1 and "no node 10.9.9.9:1" in unknown.stderr
        missing = fleet.cli("pull", "nothing-here")
        assert missing.returncode == 1 and "model 'nothing-here' not found" in missing.stderr
        for args, hint in ((["../etc/passwd"], "MODEL"), (["gemma", "--as", "../x"], "--as"),
                           (["gemma", "--as", ".hidden"], "--as"), (["gemma", "--node", "nope"], "--node")):
            bad = fleet.cli("pull", *args)
            assert bad.returncode == 2 and hint in bad.stderr and "Traceback" not in bad.stderr, (args, bad.stderr)
        # The route checks for itself what the CLI checks before sending.
        for body in ({"model": "gemma", "name": "a/../../b"}, {"model": "gemma", "name": "/etc/x"},
                     {"model": "gemma", "nodes": "all"}, {"model": "gemma", "force": True}):
            status, reply = post(fleet, "/llamafleet/v1/pull", body)
            assert status == 400 and reply["error"], (body, reply)
        assert sorted(p.name for p in store.iterdir()) == ["gemma.gguf"]


def test_an_interrupted_pull_resumes_and_the_result_verifies(tmp_path: Path, llama_cpp: Manifest,
                                                           test_model: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    total = test_model.stat().st_size
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=1, memory_limit="900MiB",
                       controller_args=("--pull-rate-limit", RATE),
                       agent_args=(("--models-dir", str(store)),)) as fleet:
        [agent] = fleet.agents

        def pulling() -> subprocess.Popen[str]:
            return subprocess.Popen(fleet.cli_argv("pull", "gemma"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)

        def grows_past(size: int) -> int:
            return wait_for(lambda: (n := partial_size(store)) > size and n, 60, f"the partial past {size} bytes",
                            interval_s=0.02)

        # 1. The client is killed (Ctrl-C, a closed terminal): the controller stops the transfer.
        cli = pulling()
        grows_past(30_000_000)
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        wait_for(lambda: any("client went away" in e["message"] for e in events(fleet, "pull.failed")), 15,
                 "the pull cancelled with its client")
        kept = settled_size(store)
        assert 30_000_000 < kept < total and ready_models(agent) == []

        # 2. The agent is killed mid-transfer and started again: it resumes from its own disk.
        cli = pulling()
        grows_past(kept + 20_000_000)
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait()
        _, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 1 and f"error: 1 of 1 node(s) failed: {agent.address}: " in stderr, stderr
        kept_after_agent = settled_size(store)
        assert kept_after_agent > kept
        agent.start_again()
        wait_for(lambda: fleet.node(agent.address)["state"] == "ready", 30, "the agent back")

        # 3. The controller is killed mid-transfer (SIGKILL: nothing runs on its way out) and started again.
        cli = pulling()
        grows_past(kept_after_agent + 20_000_000)
        assert fleet.controller is not None
        fleet.controller.send_signal(signal.SIGKILL)
        fleet.controller.wait()
        _, stderr = cli.communicate(timeout=60)
        assert cli.returncode == 1 and stderr.splitlines()[-1].startswith("error: "), stderr
        kept_after_controller = settled_size(store)
        assert kept_after_controller > kept_after_agent and ready_models(agent) == []
        fleet.start_controller([agent.address])
        wait_for(lambda: fleet.node(agent.address)["state"] == "ready", 30, "the node ready again")

        # 4. The last pull sends only what is missing, and the result verifies.
        result = fleet.cli("pull", "gemma", "--json")
        assert result.returncode == 0, result.stderr
        [part] = json.loads(result.stdout)["nodes"]
        assert (part["status"], part["resumed_from"]) == ("done", kept_after_controller)
        assert part["sent_bytes"] == total - kept_after_controller < total - 70_000_000
        assert filecmp.cmp(store / "gemma.gguf", test_model, shallow=False)
        assert ready_models(agent) == [("gemma", GEMMA_SHA256)] and hidden(store) == []
        # Each pull began where the one before it stopped (the event log outlives the controller).
        resumed = [e["data"]["resumed_from"] for e in events(fleet, "pull")]
        assert resumed == [0, kept, kept_after_agent, kept_after_controller]


def test_a_pull_whose_sha256_does_not_match_is_refused_and_leaves_nothing(tmp_path: Path, llama_cpp: Manifest,
                                                                        test_model: Path) -> None:
    copy = tmp_path / "gemma-copy.gguf"
    shutil.copyfile(test_model, copy)
    stores = [tmp_path / "store0", tmp_path / "store1"]
    for store in stores:
        store.mkdir()
    with running_fleet(tmp_path / "fleet", llama_cpp, copy, memory_limit="900MiB",
                       agent_args=tuple(("--models-dir", str(store)) for store in stores)) as fleet:
        first, second = fleet.agents
        result = fleet.cli("pull", "gemma", "--node", first.address)
        assert result.returncode == 0, result.stderr  # the controller has hashed its file now
        # Rot in place: one byte changed, size and mtime kept, so the controller's digest is stale
        # and it sends bytes that are not the file it announces.
        stat = copy.stat()
        with copy.open("r+b") as handle:
            handle.seek(stat.st_size // 2)
            byte = handle.read(1)
            handle.seek(stat.st_size // 2)
            handle.write(bytes([byte[0] ^ 0xFF]))
        os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))

        refused = fleet.cli("pull", "gemma", "--node", second.address)
        assert refused.returncode == 1
        last = refused.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: 1 of 1 node(s) failed: {second.address}: ") and "DATA_LOSS: gemma: the bytes " \
            "received have sha256 " in last and f"not {GEMMA_SHA256[:12]}… as announced: nothing was kept" in last
        assert list(stores[1].iterdir()) == []  # no file, no partial, no record
        assert second.status().models == []
        [failed] = events(fleet, "pull.failed")
        assert failed["subject"] == second.address and "DATA_LOSS" in failed["message"]
        assert ready_models(first) == [("gemma", GEMMA_SHA256)]  # what the first got is the real file


def test_nodes_sharing_one_models_dir_never_interleave_their_bytes(tmp_path: Path, llama_cpp: Manifest,
                                                                  test_model: Path) -> None:
    shared = tmp_path / "nas"  # what two workers mounting one NAS share see
    shared.mkdir()
    args = ("--models-dir", str(shared), "--models-rescan-s", "1")
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, memory_limit="900MiB",
                       controller_args=("--pull-rate-limit", RATE), agent_args=(args, args)) as fleet:
        result = fleet.cli("pull", "gemma", "--json")
        assert result.returncode == 1
        parts = sorted(json.loads(result.stdout)["nodes"], key=lambda part: part["status"])
        assert [part["status"] for part in parts] == ["done", "failed"]
        assert "ABORTED: another process is writing" in parts[1]["error"] and parts[1]["sent_bytes"] < 2**21
        assert filecmp.cmp(shared / "gemma.gguf", test_model, shallow=False) and hidden(shared) == []
        # The other node finds the file at its next rescan: both hold it, nothing is left to pull.
        for agent in fleet.agents:
            wait_for(lambda: ready_models(agent) == [("gemma", GEMMA_SHA256)], 60, "the shared file listed ready")  # noqa: B023
        wait_for(lambda: "nothing to do: 2 node(s)" in fleet.cli("pull", "gemma").stdout, 30,
                 "the controller to see both holders", interval_s=0.5)
        # The node that pulled staged the model after it; these rpc-servers are patched, so the
        # entry is a reference to the file (patches/llama.cpp/0003), named by the controller's hashes.
        [staged] = wait_for(lambda: [e for e in events(fleet, "stage") if e["data"].get("after_pull")], 60,
                            "the staging after the pull")
        assert staged["subject"] == parts[0]["node"]
        assert (staged["data"]["staged"], staged["data"]["referenced"]) == (1, 1)


@contextmanager
def small_file_system(path: Path, size: str) -> Iterator[None]:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_pull_onto_a_disk_without_room_is_refused_with_what_is_needed_and_free(tmp_path: Path, llama_cpp: Manifest,
                                                                               test_model: Path) -> None:
    small = tmp_path / "small"
    with small_file_system(small, "64m"), \
            running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=1,
                          agent_args=(("--models-dir", str(small)),)) as fleet:
        result = fleet.cli("pull", "gemma")
        assert result.returncode == 1
        needs = format_size(test_model.stat().st_size)
        last = result.stderr.strip().splitlines()[-1]  # above it: the progress lines
        assert last.startswith("error: 1 of 1 node(s) failed: ") and last.endswith(
            f"RESOURCE_EXHAUSTED: not enough disk space for gemma in {small}: needs {needs}, 64.0 MiB free")
        assert "Traceback" not in result.stderr
        assert list(small.iterdir()) == []
        [failed] = events(fleet, "pull.failed")
        assert "RESOURCE_EXHAUSTED" in failed["message"] and failed["subject"] == fleet.agents[0].address
