"""The coordinator owner's policy against stand-in llama-servers (real processes, scripted behaviour).

The real llama-server is proven by the gateway tests; these pin down what is hard to provoke
with it: an early exit named with its code and last lines, backoff to `failed`, a 503 phase
before ready, and the idle unload.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from llamafleet.common.errors import LlamafleetError
from llamafleet.common.restart import RestartPolicy
from llamafleet.controller.coordinator.command import Backend, CoordinatorSpec
from llamafleet.controller.coordinator.deployment import CoordinatorState, Deployment, Runtime

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
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")
FAST = RestartPolicy(initial_s=0.05, max_s=0.1, max_failures=3, healthy_reset_s=30, start_timeout_s=10)
SPEC = CoordinatorSpec("m:latest", Path("/nonexistent.gguf"), (Backend("n:1", "h:2", 1),), (19,), 18, 512, 1)


class OnePlace:
    def __init__(self) -> None:
        self.placed = 0
        self.released = 0

    async def place(self, model: str, ctx: int) -> CoordinatorSpec:
        self.placed += 1
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


async def _deployment(tmp_path: Path, keep_alive: float = 300) -> tuple[Deployment, OnePlace, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    placer = OnePlace()
    runtime = Runtime(lambda: fake_server(tmp_path), tmp_path / "logs", session, FAST)
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
            pid = deployment.process.proc.pid
            deployment.release()
            await asyncio.sleep(0.2)
            assert deployment.state is CoordinatorState.READY  # within its keep-alive
            for _ in range(40):
                if deployment.state is CoordinatorState.STOPPED:
                    break
                await asyncio.sleep(0.1)
            assert deployment.state is CoordinatorState.STOPPED and "keep-alive expired" in deployment.detail
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            assert placer.released == 1
        finally:
            await deployment.close()
            await session.close()

    asyncio.run(scenario())
