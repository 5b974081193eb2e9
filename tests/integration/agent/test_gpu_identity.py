"""A real ggml-rpc-server whose banner is not the GPUs it was given: a node error, never served.

A CPU build lists only `CPU`; told to expect a GPU, the check of agent/gpus.py must stop it as
failed with the reason (once: a restart would print the same banner), and an unpinned one runs.
A real agent with several rpc-servers keeps a model staged for all of them while any serves.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from llamafleet.agent.devices import DeviceInfo
from llamafleet.agent.gpus import check_banner
from llamafleet.agent.supervisor import RpcLaunch, RpcServerSnapshot, RpcServerSupervisor, RpcState
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port as free_port
from llamafleet.common.process import line_buffered, pid_alive
from llamafleet.common.restart import RestartPolicy
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import AGENT, RunningAgent, running_agent, wait_for

pytestmark = pytest.mark.integration
POLICY = RestartPolicy(initial_s=0.05, max_s=0.2, max_failures=3, healthy_reset_s=30, start_timeout_s=60.0)
GPU = DeviceInfo("gpu", 0, "NVIDIA H100 80GB HBM3", "GPU-aaaa-0041", 80 * 2**30, 79 * 2**30, 2**30,
                 pci_bus_id="00000000:41:00.0")


def _launch(llama_cpp: Manifest, port: int, expected: tuple[DeviceInfo, ...]) -> RpcLaunch:
    argv = line_buffered([llama_cpp.rpc_server, "-H", "127.0.0.1", "-p", str(port)])
    return RpcLaunch(argv, dict(os.environ), port, f"127.0.0.1:{port}", "",
                     verify=functools.partial(check_banner, expected=expected),
                     gpu_ids=tuple((g.uuid, g.pci_bus_id) for g in expected))


async def _settle(supervisor: RpcServerSupervisor, timeout_s: float = 90.0) -> RpcServerSnapshot:
    """Run it until running or failed; that snapshot (taken before the cancel stops it)."""
    task = asyncio.create_task(supervisor.run())
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while supervisor.snapshot().state not in (RpcState.RUNNING, RpcState.FAILED):
            assert asyncio.get_running_loop().time() < deadline, f"stuck in {supervisor.snapshot()}"
            await asyncio.sleep(0.05)
        return supervisor.snapshot()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_banner_without_the_pinned_gpu_fails_the_rpc_server_with_the_reason(llama_cpp: Manifest) -> None:
    pids: list[int] = []
    supervisor: RpcServerSupervisor

    def seen() -> None:
        if pid := supervisor.snapshot().pid:
            pids.append(pid)

    port = free_port()
    supervisor = RpcServerSupervisor(lambda: _launch(llama_cpp, port, (GPU,)), POLICY, on_change=seen)
    snap = asyncio.run(_settle(supervisor))
    assert snap.state == RpcState.FAILED
    assert snap.last_exit.startswith("GPU identity: the rpc-server lists 0 CUDA device(s)")
    assert "GPU-aaaa-0041" in snap.last_exit
    # The real banner it refused is kept for the operator, and the process is gone, not restarted.
    assert [d.name for d in snap.devices] == ["CPU"] and snap.restarts == 0 and snap.generation == 1
    assert pids and not any(pid_alive(p) for p in set(pids))


def test_an_unpinned_rpc_server_is_not_checked_and_runs(llama_cpp: Manifest) -> None:
    port = free_port()
    supervisor = RpcServerSupervisor(lambda: _launch(llama_cpp, port, ()), POLICY)
    snap = asyncio.run(_settle(supervisor))
    assert snap.state == RpcState.RUNNING and snap.gpu_ids == () and [d.name for d in snap.devices] == ["CPU"]


def test_a_per_device_agent_on_a_cpu_worker_reports_its_layout_and_slots(tmp_path: Path, llama_cpp: Manifest) -> None:
    # No GPU here: a slot is one rpc-server in either layout, and the wire says which layout.
    with running_agent(tmp_path, llama_cpp.install_dir,
                       extra_args=("--rpc-layout", "per-device", "--max-rpc-servers", "2")) as agent:
        wait_for(lambda: agent.rpc().state == pb.RPC_SERVER_STATE_RUNNING, 30, "rpc-server running")
        status = agent.status()
        assert status.rpc_layout == "per-device"
        assert [(r.index, r.slot) for r in status.rpc_servers] == [(0, 0), (1, 1)]
        assert [(d.name, d.uuid) for d in status.rpc_server.devices] == [("CPU", "")]


def _cache(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, "cache", *args, "--state-dir", str(agent.state_dir),
                           "--cache-dir", str(agent.state_dir.parent / "cache")],
                          capture_output=True, text=True, timeout=60)


def _in_use_by(agent: RunningAgent) -> list[int]:
    [model] = json.loads(_cache(agent, "ls", "--json").stdout)["models"]
    return list(model["rpc_server_indexes"])


def test_a_model_staged_for_several_rpc_servers_is_kept_while_any_of_them_serves(
        tmp_path: Path, stock_llama_cpp: Manifest, test_model: Path) -> None:
    # What the controller asks of a per-device node whose share spans two GPUs: one staging for
    # rpc-servers #0 and #1. On this CPU worker a slot is one process, so two slots stand in for
    # the two GPUs' processes (the same supervisors, generations and records). Stock rpc-servers:
    # the agent copies the entry (a patched one would get a reference).
    header = read_gguf_header(test_model)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")  # 170 MiB, the one entry
    store = tmp_path / "store"
    store.mkdir()
    (store / "gemma.gguf").symlink_to(test_model)
    with running_agent(tmp_path / "agent", stock_llama_cpp.install_dir,
                       extra_args=("--max-rpc-servers", "2", "--models-dir", str(store))) as agent:
        sha = wait_for(lambda: next((m.sha256 for m in agent.status().models
                                     if m.state == pb.MODEL_FILE_STATE_READY), None), 60, "gemma hashed")
        wait_for(lambda: agent.rpc().state == pb.RPC_SERVER_STATE_RUNNING, 30, "rpc-server #0 running")
        started = agent.stub.StartRpcServer(pb.StartRpcServerRequest(index=1), metadata=agent.metadata, timeout=60)
        assert started.rpc_server.state == pb.RPC_SERVER_STATE_RUNNING
        # As the controller sends it: the first index in the old field (older agents read only
        # that), all of them in the list.
        request = pb.StageTensorsRequest(sha256=sha, ranges=[pb.ByteRange(offset=header.data_offset + embd.offset,
                                                                            size=embd.n_bytes)],
                                         rpc_server_index=0, rpc_server_indexes=[0, 1])
        reply = agent.stub.StageTensors(request, metadata=agent.metadata, timeout=120)
        assert reply.staged == 1 and reply.cached_bytes == embd.n_bytes
        assert _in_use_by(agent) == [0, 1]

        # #0 restarts (a new generation holds no tensors): #1 still serves the model, so even a
        # cap of one byte keeps its entry.
        agent.stub.RestartRpcServer(pb.RestartRpcServerRequest(index=0), metadata=agent.metadata, timeout=60)
        assert _in_use_by(agent) == [1]
        capped = _cache(agent, "gc", "--max", "1")
        assert capped.returncode == 1 and "in use by running coordinators" in capped.stderr, capped.stderr
        assert len(json.loads(_cache(agent, "ls", "--json").stdout)["entries"]) == 1

        # Once neither serves it, it is not in use (and evictable, once older than the 10 s in
        # which an entry may still be being written).
        agent.stub.StopRpcServer(pb.StopRpcServerRequest(index=1), metadata=agent.metadata, timeout=60)
        [model] = json.loads(_cache(agent, "ls", "--json").stdout)["models"]
        assert (model["in_use"], model["rpc_server_indexes"]) == (False, [])

        # An index the agent does not have, anywhere in the list, is refused before any file work.
        request.rpc_server_indexes[:] = [1, 7]
        with pytest.raises(grpc.RpcError) as refused:
            agent.stub.StageTensors(request, metadata=agent.metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "no rpc-server #7: this agent runs at most 2 (--max-rpc-servers 2 × 1 per slot)"
