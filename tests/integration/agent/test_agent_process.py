"""`llamafleet-agent serve` as a real process over the real ggml-rpc-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.process import pid_alive, wait_gone
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import AGENT, NotifySocket, running_agent, wait_for

pytestmark = pytest.mark.integration
RUNNING = pb.RPC_SERVER_STATE_RUNNING


def _listening(pid: int, endpoint: str) -> bool:
    host, port = endpoint.rsplit(":", 1)
    return any(c.status == psutil.CONN_LISTEN and c.laddr.ip == host and c.laddr.port == int(port)
               for c in psutil.Process(pid).net_connections("tcp"))


def test_starts_rpc_server_and_reports_its_banner(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir, extra_args=("--memory-limit", "120MiB")) as agent:
        rpc = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r, 30, "rpc-server running")
        assert rpc.endpoint == agent.rpc_endpoint
        assert rpc.protocol_version == llama_cpp.rpc_protocol_version
        assert [d.name for d in rpc.devices] == ["CPU"] and rpc.devices[0].total_bytes > 0
        assert rpc.generation == 1 and rpc.restarts == 0
        assert rpc.cache_dir == str(tmp_path / "cache" / "rpc")
        assert _listening(rpc.pid, agent.rpc_endpoint), "bound to exactly the address given"
        status = agent.status()
        cpu = [d for d in status.devices if d.kind == pb.DEVICE_KIND_CPU][0]
        assert cpu.total_bytes == 120 * 1024 * 1024 and cpu.physical_total_bytes > cpu.total_bytes
        assert status.memory_limit_bytes == 120 * 1024 * 1024
        assert status.host.total_bytes == psutil.virtual_memory().total
        assert status.build.rpc_protocol_version == llama_cpp.rpc_protocol_version
        assert status.node.node_id


def test_kill_9_of_rpc_server_restarts_it_within_3_seconds(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        first = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r, 30, "rpc-server running")
        watch = agent.stub.WatchStatus(pb.WatchStatusRequest(heartbeat_interval_ms=60_000), metadata=agent.metadata)
        assert next(watch).reason == pb.WATCH_REASON_INITIAL
        os.kill(first.pid, signal.SIGKILL)
        second = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r.generation > first.generation and r,
                          3.0, "rpc-server back to running")
        assert second.restarts == first.restarts + 1
        assert second.pid != first.pid and pid_alive(second.pid)
        assert "SIGKILL" in second.last_exit
        # The watch saw the change at once, not at the (one-minute) heartbeat.
        update = next(watch)
        assert update.reason == pb.WATCH_REASON_CHANGE
        watch.cancel()


def test_watch_sends_heartbeats(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        wait_for(lambda: agent.rpc().state == RUNNING, 30, "rpc-server running")
        watch = agent.stub.WatchStatus(pb.WatchStatusRequest(heartbeat_interval_ms=100), metadata=agent.metadata)
        reasons = [next(watch).reason for _ in range(4)]
        watch.cancel()
        assert reasons[0] == pb.WATCH_REASON_INITIAL
        assert reasons[1:] == [pb.WATCH_REASON_HEARTBEAT] * 3


def test_stop_start_restart_rpcs(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        first = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r, 30, "rpc-server running")
        stopped = agent.stub.StopRpcServer(pb.StopRpcServerRequest(), metadata=agent.metadata, timeout=30).rpc_server
        assert stopped.state == pb.RPC_SERVER_STATE_STOPPED and stopped.pid == 0
        assert wait_gone(first.pid, 2)
        started = agent.stub.StartRpcServer(pb.StartRpcServerRequest(), metadata=agent.metadata, timeout=30).rpc_server
        assert started.state == RUNNING and started.generation == first.generation + 1
        restarted = agent.stub.RestartRpcServer(pb.RestartRpcServerRequest(), metadata=agent.metadata, timeout=30).rpc_server
        assert restarted.state == RUNNING and restarted.generation == started.generation + 1
        assert restarted.restarts == 0, "requested restarts are not crashes"
        assert not pid_alive(started.pid)


def test_a_second_rpc_server_runs_beside_the_first_on_the_next_port(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir, extra_args=("--max-rpc-servers", "2")) as agent:
        first = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r, 30, "rpc-server running")
        status = agent.status()
        assert [r.index for r in status.rpc_servers] == [0, 1]
        assert status.rpc_servers[1].state == pb.RPC_SERVER_STATE_STOPPED
        host, port = first.endpoint.rsplit(":", 1)
        assert status.rpc_servers[1].endpoint == f"{host}:{int(port) + 1}"
        second = agent.stub.StartRpcServer(pb.StartRpcServerRequest(index=1), metadata=agent.metadata,
                                           timeout=30).rpc_server
        assert second.state == RUNNING and second.index == 1 and second.endpoint == f"{host}:{int(port) + 1}"
        assert second.pid != first.pid and pid_alive(second.pid) and pid_alive(first.pid)
        assert second.devices and second.protocol_version == first.protocol_version
        # The first is untouched; the list and the legacy field agree.
        status = agent.status()
        assert status.rpc_server.pid == first.pid and status.rpc_servers[0].pid == first.pid
        with pytest.raises(grpc.RpcError) as caught:
            agent.stub.StartRpcServer(pb.StartRpcServerRequest(index=2), metadata=agent.metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-rpc-servers" in (caught.value.details() or "")
        stopped = agent.stub.StopRpcServer(pb.StopRpcServerRequest(index=1), metadata=agent.metadata,
                                           timeout=30).rpc_server
        assert stopped.state == pb.RPC_SERVER_STATE_STOPPED and wait_gone(second.pid, 2) and pid_alive(first.pid)
        # The agent's JSON status lists both for scripts.
        doc = json.loads(subprocess.run([AGENT, "status", "--address", agent.address, "--token-file",
                                         str(agent.state_dir / "token"), "--json"],
                                        capture_output=True, text=True, timeout=30).stdout)
        assert [r["index"] for r in doc["rpc_servers"]] == [0, 1] and doc["rpc_server"]["index"] == 0


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_calls_without_the_right_token_are_refused_before_any_effect(tmp_path: Path, llama_cpp: Manifest, token: str | None) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        before = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r, 30, "rpc-server running")
        metadata = [("authorization", f"Bearer {token}")] if token else []
        for call, request in ((agent.stub.StopRpcServer, pb.StopRpcServerRequest()),
                              (agent.stub.GetStatus, pb.GetStatusRequest())):
            with pytest.raises(grpc.RpcError) as caught:
                call(request, metadata=metadata, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            next(agent.stub.Build(pb.BuildRequest(source="/nonexistent"), metadata=metadata, timeout=5))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        after = agent.rpc()
        assert (after.state, after.pid, after.generation) == (RUNNING, before.pid, before.generation)
        assert not (agent.state_dir / "llama.cpp").exists(), "the refused build wrote nothing"
        # Health stays public, and the token never reaches the log.
        # types-grpcio-health-checking declares HealthStub without its methods.
        health_stub = health_pb2_grpc.HealthStub(agent.channel)
        health = health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # type: ignore[attr-defined]
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert agent.token not in agent.log() and "wrong-token" not in agent.log()
        assert "refused /llamafleet.v1.AgentService/StopRpcServer" in agent.log()


def test_build_rpc_with_a_bad_source_is_invalid_argument(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        with pytest.raises(grpc.RpcError) as caught:
            list(agent.stub.Build(pb.BuildRequest(source="not-a-source"), metadata=agent.metadata, timeout=10))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown source kind" in (caught.value.details() or "")


def test_systemd_notify_protocol(tmp_path: Path, llama_cpp: Manifest) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
        with running_agent(tmp_path, llama_cpp.install_dir, env=env) as agent:
            fields = wait_for(lambda: "READY=1" in (f := notify.fields()) and f, 30, "READY=1")
            # READY only once the rpc-server runs: the STATUS sent with it says so.
            ready_status = fields[fields.index("READY=1") + 1]
            assert ready_status.startswith("STATUS=rpc-server running at " + agent.rpc_endpoint)
            assert agent.rpc().state == RUNNING
            wait_for(lambda: notify.fields().count("WATCHDOG=1") >= 2, 5, "two watchdog pings at half of 1 s")
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(timeout=15) == 0
            assert "STOPPING=1" in notify.fields()
    finally:
        notify.close()


def test_agent_sigterm_leaves_no_rpc_server(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        rpc = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r, 30, "rpc-server running")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=15) == 0
        assert wait_gone(rpc.pid, 2), "rpc-server outlived the agent"


def test_agent_sigkill_leaves_no_rpc_server(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        rpc = wait_for(lambda: (r := agent.rpc()).state == RUNNING and r, 30, "rpc-server running")
        agent.proc.kill()
        agent.proc.wait(timeout=5)
        assert wait_gone(rpc.pid, 2), "rpc-server outlived a SIGKILLed agent"


def test_status_cli_json(tmp_path: Path, llama_cpp: Manifest) -> None:
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        wait_for(lambda: agent.rpc().state == RUNNING, 30, "rpc-server running")
        result = subprocess.run([AGENT, "status", "--address", agent.address, "--token-file",
                                 str(agent.state_dir / "token"), "--json"], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        rpc = doc["rpc_server"]
        assert rpc["state"] == "running" and rpc["pid"] > 0 and rpc["restarts"] == 0
        assert rpc["endpoint"] == agent.rpc_endpoint and rpc["protocol_version"] == llama_cpp.rpc_protocol_version
        assert doc["build"]["commit"] == (llama_cpp.commit or "")
        assert doc["build"]["rpc_protocol_version"] == llama_cpp.rpc_protocol_version
        assert all({"name", "total_bytes", "free_bytes"} <= set(d) for d in doc["devices"])
        wrong = tmp_path / "wrong-token"
        wrong.write_text("nope\n")
        refused = subprocess.run([AGENT, "status", "--address", agent.address, "--token-file", str(wrong)],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and "refused the token" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_status_cli_unreachable_agent(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    result = subprocess.run([AGENT, "status", "--address", "127.0.0.1:1", "--token-file", str(token), "--timeout", "2"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("error: agent at 127.0.0.1:1 is unreachable")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rpc-host", "0.0.0.0"], "exposes the unauthenticated rpc-server"),
        (["--rpc-host", "localhost"], "must be an IPv4 address literal"),
        (["--rpc-port", "70000"], "rpc_port must be 1..65535"),
        (["--memory-limit", "lots"], "invalid memory_limit from --memory-limit: not a size"),
        (["--listen", "nowhere"], "is not HOST:PORT"),
        (["--rpc-layout", "both"], "rpc_layout must be one of shared, per-device, not 'both'"),
    ],
)
def test_bad_serve_flags_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = subprocess.run([AGENT, "serve", "--state-dir", str(tmp_path / "s"), *args],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_build_rpc_streams_progress_then_the_result(tmp_path: Path, llama_cpp: Manifest) -> None:
    from tests.unit.common.llamacpp.fake_tree import make_fake_tree

    tree = make_fake_tree(tmp_path / "fake-llama.cpp")
    with running_agent(tmp_path, llama_cpp.install_dir) as agent:
        # The fake tree is not llama.cpp: the patch set would not apply (a test of its own below).
        request = pb.BuildRequest(source=str(tree), cuda=pb.CUDA_MODE_OFF, jobs=2, no_patches=True)
        replies = list(agent.stub.Build(request, metadata=agent.metadata, timeout=120))
        *progress, last = replies
        steps = [r.progress.step for r in progress]
        assert {"resolve", "configure", "compile", "verify", "activate"} <= set(steps)
        assert any(r.progress.total and r.progress.done == r.progress.total for r in progress)
        assert last.WhichOneof("event") == "result" and not last.result.cached
        assert last.result.build.rpc_protocol_version == "7.0.0"
        assert (agent.state_dir / "llama.cpp" / "current").resolve() == Path(last.result.build.install_dir)
        again = list(agent.stub.Build(request, metadata=agent.metadata, timeout=120))
        assert again[-1].result.cached
        assert list(last.result.build.patches) == []
        # With the patch set (the default), a source it does not apply to fails at `patch`, by name.
        patched = pb.BuildRequest(source=str(tree), cuda=pb.CUDA_MODE_OFF, jobs=2)
        with pytest.raises(grpc.RpcError) as refused:
            list(agent.stub.Build(patched, metadata=agent.metadata, timeout=120))
        assert "step 'patch'" in (refused.value.details() or "") and "0001-" in (refused.value.details() or "")
        assert (agent.state_dir / "llama.cpp" / "current").resolve() == Path(last.result.build.install_dir)


def test_sigterm_during_a_slow_start_stops_at_once_without_ready(tmp_path: Path, llama_cpp: Manifest) -> None:
    import dataclasses

    from llamafleet.common.llamacpp.install import write_manifest

    slow = tmp_path / "slow-llama.cpp"
    (slow / "bin").mkdir(parents=True)
    wrapper = slow / "bin" / "ggml-rpc-server"
    wrapper.write_text(f"#!/bin/sh\nsleep 30\nexec {llama_cpp.rpc_server} \"$@\"\n")
    wrapper.chmod(0o755)
    (slow / "bin" / "llama-server").symlink_to(llama_cpp.llama_server)
    write_manifest(slow, dataclasses.replace(llama_cpp, rpc_server=str(wrapper),
                                             llama_server=str(slow / "bin" / "llama-server")))
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        with running_agent(tmp_path, slow, env={"NOTIFY_SOCKET": str(notify.path)}) as agent:
            starting = agent.rpc()
            assert starting.state == pb.RPC_SERVER_STATE_STARTING
            agent.proc.send_signal(signal.SIGTERM)
            assert agent.proc.wait(timeout=10) == 0, "a stop during start-up must not wait for the rpc-server"
            assert "READY=1" not in notify.fields()
            assert wait_gone(starting.pid, 2), "the half-started rpc-server outlived the agent"
    finally:
        notify.close()
