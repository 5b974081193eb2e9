"""A real ggml-rpc-server whose banner is not the GPUs it was given: a node error, never served.

A CPU build lists only `CPU`; told to expect a GPU, the check of agent/gpus.py must stop it as
failed with the reason (once: a restart would print the same banner), and an unpinned one runs.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

import pytest

from llamafleet.agent.devices import DeviceInfo
from llamafleet.agent.gpus import check_banner
from llamafleet.agent.supervisor import RpcLaunch, RpcServerSnapshot, RpcServerSupervisor, RpcState
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port as free_port
from llamafleet.common.process import line_buffered, pid_alive
from llamafleet.common.restart import RestartPolicy
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import running_agent, wait_for

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
