"""The coordinator owner's policy against stand-in llama-servers (real processes, scripted behaviour).

The real llama-server is proven by the gateway tests; these pin down what is hard to provoke
with it: an early exit named with its code and last lines, backoff to `failed`, a 503 phase
before ready, and the idle unload.
"""

from __future__ import annotations

import asyncio
import os
import sys
import sqlite3
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llamafleet.common.errors import LlamafleetError
from llamafleet.common.restart import RestartPolicy
from llamafleet.controller.coordinator.command import Backend, CoordinatorSpec
from llamafleet.controller.coordinator.deployment import CoordinatorState, Deployment, Runtime
from tests.integration.controller.disk import fill, small_tmpfs

pytestmark = pytest.mark.integration
FAKE = textwrap.dedent("""\
    #!{python}
    import http.server, os, sys, time
    mode = os.environ["FAKE_MODE"]
    port = int(sys.argv[sys.argv.index("--port") + 1])
    if mode == "exit":
        print("llama_model_load: error loading model: boom", flush=True)
        sys.exit(3)
    started = time.monotonic()
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if time.monotonic() - started > 1.0 else 503)
            self.end_headers()
        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", port), Health)
    if mode == "chatty":
        # Healthy from a thread while the main thread talks: 2 MB, far more than a pipe holds.
        import threading
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for n in range(20_000):
            print("slot update_slots: id 0 | task %d | %s" % (n, "x" * 80), flush=True)
        open(os.environ["FAKE_DONE"], "w").close()
        time.sleep(3600)
    server.serve_forever()
""")
FAST = RestartPolicy(initial_s=0.05, max_s=0.1, max_failures=3, healthy_reset_s=30, start_timeout_s=10)
SPEC = CoordinatorSpec("m:latest", Path("/nonexistent.gguf"), (Backend("n:1", "h:2", 1),), (19,), 18, 512, 1)


class OnePlace:
    def __init__(self, fail_first: BaseException | None = None) -> None:
        self.placed = 0
        self.released = 0
        self.fail_first = fail_first

    async def place(self, model: str, ctx: int) -> CoordinatorSpec:
        self.placed += 1
        if self.fail_first is not None and self.placed == 1:
            raise self.fail_first
        return SPEC

    def release(self, model: str) -> None:
        self.released += 1

    def check(self, model: str, ctx: int) -> None:
        return None

    def backends_changed(self, spec: CoordinatorSpec) -> str | None:
        return None


def fake_server(tmp_path: Path) -> Path:
    path = tmp_path / "llama-server"
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(0o755)
    return path


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, kind: str, subject: str, message: str, **data: Any) -> None:
        self.seen.append((kind, message))


def state(deployment: Deployment) -> CoordinatorState:
    """The state now: a call, so mypy keeps no narrowed `deployment.state` across an await."""
    return deployment.state


async def _deployment(tmp_path: Path, keep_alive: float = 300, *, placer: OnePlace | None = None,
                      log_root: Path | None = None,
                      events: Events | None = None) -> tuple[Deployment, OnePlace, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    placer = placer or OnePlace()
    async def llama_server() -> Path:
        return fake_server(tmp_path)

    runtime = Runtime(llama_server, log_root or tmp_path / "logs", session, FAST,
                      events or Events())
    return Deployment("m:latest", placer, runtime, keep_alive), placer, session


def test_early_exits_back_off_then_fail_with_the_exit_and_last_lines(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "exit")

    async def scenario() -> None:
        deployment, placer, session = await _deployment(tmp_path)
        try:
            with pytest.raises(LlamafleetError) as caught:
                await deployment.acquire(512)
            assert "exited with code 3" in caught.value.message
            assert "error loading model: boom" in (caught.value.detail or "")
            assert deployment.state is CoordinatorState.FAILED and placer.placed == FAST.max_failures
            assert placer.released == placer.placed  # no memory stays promised to a dead coordinator
            assert len(list((tmp_path / "logs" / "m@latest").glob("*.log"))) == FAST.max_failures
        finally:
            await session.close()

    asyncio.run(scenario())


def test_ready_only_after_health_says_200_and_unloaded_when_idle(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "serve")

    async def scenario() -> None:
        deployment, placer, session = await _deployment(tmp_path, keep_alive=0.5)
        try:
            lease = await deployment.acquire(512)
            assert lease.load_duration_s >= 1.0  # the 503 phase was waited out
            assert deployment.state is CoordinatorState.READY and deployment.incarnation == 1
            assert deployment.process is not None
            pid = deployment.process.pid
            deployment.release()
            await asyncio.sleep(0.2)
            assert deployment.state is CoordinatorState.READY  # within its keep-alive
            for _ in range(40):
                if state(deployment) is CoordinatorState.STOPPED:
                    break
                await asyncio.sleep(0.1)
            assert state(deployment) is CoordinatorState.STOPPED and "keep-alive expired" in deployment.detail
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            assert placer.released == 1
        finally:
            await deployment.close()
            await session.close()

    asyncio.run(scenario())


def test_an_unexpected_error_while_placing_fails_the_request_once_and_the_next_request_tries_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: the lifecycle task died, the waiter started another, 41,495 place() calls in 2 s."""
    monkeypatch.setenv("FAKE_MODE", "serve")

    async def scenario() -> None:
        events = Events()
        placer = OnePlace(fail_first=sqlite3.OperationalError("database or disk is full"))
        deployment, placer, session = await _deployment(tmp_path, placer=placer, events=events)
        try:
            with pytest.raises(LlamafleetError, match="database or disk is full"):
                await asyncio.wait_for(deployment.acquire(512), 10)
            await asyncio.sleep(0.5)  # a spinning lifecycle would place again meanwhile
            assert placer.placed == 1 and placer.released >= 1
            assert deployment.state is CoordinatorState.FAILED and "database or disk is full" in deployment.detail
            kinds = [kind for kind, _ in events.seen]
            assert "task.failed" in kinds and kinds[-1] == "coordinator.failed"
            # The cause went away: the next request loads it.
            await asyncio.wait_for(deployment.acquire(512), 20)
            assert state(deployment) is CoordinatorState.READY and placer.placed == 2
            deployment.release()
        finally:
            await deployment.close()
            await session.close()

    asyncio.run(scenario())


def test_a_log_folder_that_cannot_be_made_does_not_keep_the_model_from_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: OSError from next_log_path made every waiter start the lifecycle again, forever."""
    monkeypatch.setenv("FAKE_MODE", "serve")
    not_a_folder = tmp_path / "logs"
    not_a_folder.write_text("a file where the log folder belongs\n")

    async def scenario() -> None:
        deployment, placer, session = await _deployment(tmp_path, log_root=not_a_folder)
        try:
            await asyncio.wait_for(deployment.acquire(512), 20)
            assert deployment.state is CoordinatorState.READY and placer.placed == 1
            assert deployment.process is not None and deployment.process.log_path is None
            assert "cannot make a log file" in deployment.process.log_error
            deployment.release()
        finally:
            await deployment.close()
            await session.close()

    asyncio.run(scenario())


def test_a_full_log_disk_never_freezes_llama_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was: the first failed write ended the reader; nobody drained the pipe; llama-server froze."""
    done = tmp_path / "chatty.done"
    monkeypatch.setenv("FAKE_MODE", "chatty")
    monkeypatch.setenv("FAKE_DONE", str(done))

    async def scenario(log_root: Path) -> None:
        deployment, placer, session = await _deployment(tmp_path, log_root=log_root)
        try:
            await asyncio.wait_for(deployment.acquire(512), 20)
            deadline = time.monotonic() + 30
            while not done.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert done.exists(), "llama-server blocked writing its output"
            process = deployment.process
            assert process is not None and process.alive
            assert process.log_lines_lost > 10_000 and "No space left on device" in process.log_error
            deployment.release()
        finally:
            await deployment.close()
            await session.close()

    with small_tmpfs(tmp_path / "disk") as disk:
        (disk / "m@latest").mkdir()
        fill(disk)
        asyncio.run(scenario(disk))
