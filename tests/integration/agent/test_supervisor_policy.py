"""The supervisor's restart policy against real child processes that misbehave on purpose."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from llamafleet.agent.supervisor import RpcLaunch, RpcServerSnapshot, RpcServerSupervisor, RpcState
from llamafleet.common.restart import RestartPolicy
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.process import pid_alive

pytestmark = pytest.mark.integration
FAST = RestartPolicy(initial_s=0.05, max_s=0.2, max_failures=3, healthy_reset_s=30, start_timeout_s=1.0)


def _launch(script: str) -> RpcLaunch:
    return RpcLaunch(["/bin/sh", "-c", script], dict(os.environ), port=1, endpoint="127.0.0.1:1", cache_dir="")


async def _until(supervisor: RpcServerSupervisor, predicate: Callable[[RpcServerSnapshot], bool],
                 timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate(supervisor.snapshot()):
        assert asyncio.get_running_loop().time() < deadline, f"stuck in {supervisor.snapshot()}"
        await asyncio.sleep(0.01)


async def _run(supervisor: RpcServerSupervisor, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(supervisor.run())
    try:
        await body()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_binary_that_exits_at_once_backs_off_then_fails_with_the_cause() -> None:
    states: list[RpcState] = []
    supervisor: RpcServerSupervisor

    def record() -> None:
        states.append(supervisor.snapshot().state)

    supervisor = RpcServerSupervisor(lambda: _launch("echo 'No devices found' >&2; exit 3"), FAST, on_change=record)

    async def body() -> None:
        await _until(supervisor, lambda s: s.state == RpcState.FAILED)

    asyncio.run(_run(supervisor, body))
    snap = supervisor.snapshot()
    assert RpcState.BACKOFF in states
    assert "exited with code 3 before it was ready" in snap.last_exit and "3 failures in a row" in snap.last_exit
    assert "No devices found" in snap.last_output
    assert snap.restarts == 2 and snap.generation == 3
    assert supervisor.at_rest()


def test_killed_by_a_signal_is_named() -> None:
    supervisor = RpcServerSupervisor(lambda: _launch("kill -SEGV $$"), FAST)

    async def body() -> None:
        await _until(supervisor, lambda s: s.state == RpcState.FAILED)

    asyncio.run(_run(supervisor, body))
    assert "killed by signal SIGSEGV (Segmentation fault)" in supervisor.snapshot().last_exit


def test_no_banner_within_the_start_timeout_is_a_failure_and_the_child_is_stopped() -> None:
    supervisor = RpcServerSupervisor(lambda: _launch("echo waiting; exec sleep 60"), FAST)
    pids: list[int] = []

    async def body() -> None:
        await _until(supervisor, lambda s: s.state == RpcState.STARTING and s.pid > 0)
        pids.append(supervisor.snapshot().pid)
        await _until(supervisor, lambda s: s.state == RpcState.BACKOFF)

    asyncio.run(_run(supervisor, body))
    assert "not ready within 1 s" in supervisor.snapshot().last_exit
    assert not pid_alive(pids[0])


def test_stop_during_backoff_stops_for_good() -> None:
    slow = RestartPolicy(initial_s=5, max_s=5, max_failures=3, start_timeout_s=1.0)
    supervisor = RpcServerSupervisor(lambda: _launch("exit 1"), slow)

    async def body() -> None:
        await _until(supervisor, lambda s: s.state == RpcState.BACKOFF)
        ticket = supervisor.request("stop")
        snap = await supervisor.wait_settled(ticket, 5)
        assert snap.state == RpcState.STOPPED
        await asyncio.sleep(0.3)
        assert supervisor.snapshot().state == RpcState.STOPPED and supervisor.snapshot().generation == 1

    asyncio.run(_run(supervisor, body))


def test_missing_install_fails_at_once_with_its_message() -> None:
    def no_install() -> RpcLaunch:
        raise LlamafleetError("no llama.cpp build in /var/lib/x: run `llamafleet-agent build`")

    supervisor = RpcServerSupervisor(no_install, FAST)

    async def body() -> None:
        await _until(supervisor, lambda s: s.state == RpcState.FAILED)

    asyncio.run(_run(supervisor, body))
    assert supervisor.snapshot().last_exit.startswith("no llama.cpp build")
    assert supervisor.snapshot().generation == 0


def test_backoff_delays_grow_and_are_capped() -> None:
    policy = RestartPolicy(initial_s=0.5, max_s=4.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_cancelling_the_supervisor_stops_the_child(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    supervisor = RpcServerSupervisor(lambda: _launch(f"touch {marker}; exec sleep 60"), FAST)
    pids: list[int] = []

    async def body() -> None:
        await _until(supervisor, lambda s: s.pid > 0 and marker.exists())
        pids.append(supervisor.snapshot().pid)

    asyncio.run(_run(supervisor, body))
    assert not pid_alive(pids[0])


def test_start_after_failed_leaves_the_failed_state_at_once() -> None:
    """Once a start is taken, no waiter may see the old settled state (it would answer with it)."""
    ready = {"binary": False}

    def launch() -> RpcLaunch:
        if not ready["binary"]:
            raise LlamafleetError("no llama.cpp build yet")
        return _launch("exit 1")

    supervisor = RpcServerSupervisor(launch, FAST)

    async def body() -> None:
        await _until(supervisor, lambda s: s.state == RpcState.FAILED)
        ready["binary"] = True
        ticket = supervisor.request("start")
        while supervisor._handled < ticket:  # the first moment the request counts as handled
            await asyncio.sleep(0)
        assert supervisor.snapshot().state == RpcState.STARTING
        snap = await supervisor.wait_settled(ticket, 5)
        assert snap.generation >= 1 and snap.state in (RpcState.BACKOFF, RpcState.FAILED)

    asyncio.run(_run(supervisor, body))


def test_a_line_longer_than_the_pipe_reader_allows_does_not_stop_the_reading() -> None:
    # 100 KiB without a newline (the reader's limit is 64 KiB), then more than a pipe holds: were
    # the reader to die, the child would block on its full pipe and never print its last line.
    script = ("head -c 100000 /dev/zero | tr '\\\\0' x; echo; "
              "i=0; while [ $i -lt 2000 ]; do echo \"line $i of a chatty child, long enough to fill a pipe\"; "
              "i=$((i+1)); done; echo 'all written'; exec sleep 60")
    supervisor = RpcServerSupervisor(lambda: _launch(script), FAST)

    async def body() -> None:
        await _until(supervisor, lambda s: "all written" in s.recent_output)

    asyncio.run(_run(supervisor, body))


def test_a_supervisor_loop_that_raises_is_reported_backs_off_and_runs_again(caplog: pytest.LogCaptureFixture) -> None:
    from llamafleet.agent.daemon import BACKGROUND_RESTART
    from llamafleet.common.supervised import Supervised

    calls = 0

    def launch() -> RpcLaunch:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("a bug in the launch")  # not a LlamafleetError: nobody expects it
        return _launch("echo started; exec sleep 60")

    supervisor = RpcServerSupervisor(launch, FAST)
    states: list[RpcServerSnapshot] = []

    async def main() -> None:
        task = Supervised("rpc-server #0 supervisor", supervisor.run, on_failure=supervisor.loop_failed,
                          restart=BACKGROUND_RESTART)
        try:
            await _until(supervisor, lambda s: s.state == RpcState.BACKOFF)
            states.append(supervisor.snapshot())
            # The back-off is not a wedged loop: the watchdog judges it from when the retry is due.
            assert supervisor.last_tick > time.monotonic() - 1
            await _until(supervisor, lambda s: s.state == RpcState.STARTING and s.pid > 0)
            states.append(supervisor.snapshot())
        finally:
            await task.stop()

    asyncio.run(main())
    backoff, started = states
    assert backoff.last_exit == "the supervisor's loop failed: RuntimeError: a bug in the launch"
    assert backoff.next_start_unix_ms > 0
    assert "started" in supervisor.snapshot().recent_output or started.pid > 0
    # Logged once with its traceback; the second time, one line.
    failures = [r for r in caplog.records if "rpc-server #0 supervisor failed" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None and failures[1].exc_info is None
