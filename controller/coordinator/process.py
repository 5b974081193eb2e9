"""One `llama-server` process: spawn it, keep its log, wait until it is healthy, stop it.

No policy lives here (when to restart, what to place): that is the deployment's. A process
is ready when `GET /health` answers 200; llama-server answers 503 while the model loads, and
the process is watched for an early exit at every poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path

import aiohttp
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.process import (
    STOP_GRACE_S,
    describe_exit,
    spawn_group_async,
    stop_group_async,
)
from llamafleet.controller.coordinator.command import (
    CoordinatorSpec,
    coordinator_argv,
    coordinator_env,
)

log = logging.getLogger(__name__)
HEALTH_POLL_S = 0.1
OUTPUT_LINES_KEPT = 30
LOGS_KEPT_PER_MODEL = 10


class CoordinatorExited(LlamafleetError):
    """llama-server ended (or never became healthy); the message names how, the detail shows its last lines."""


def log_dir_name(model: str) -> str:
    """A model name as one safe path segment (names may hold '/' and ':')."""
    return model.replace("/", "_").replace(":", "@")


def numbered_logs(folder: Path) -> list[tuple[int, Path]]:
    """The `<n>.log` files of one model's log folder, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((int(p.stem), p) for p in folder.glob("*.log") if p.stem.isdigit())


def next_log_path(root: Path, model: str) -> Path:
    """`root/<model>/<n>.log`, one file per start; the oldest beyond LOGS_KEPT_PER_MODEL go."""
    folder = root / log_dir_name(model)
    folder.mkdir(parents=True, exist_ok=True)
    numbered = numbered_logs(folder)
    for _, old in numbered[: max(len(numbered) - LOGS_KEPT_PER_MODEL + 1, 0)]:
        old.unlink(missing_ok=True)
    return folder / f"{(numbered[-1][0] + 1) if numbered else 1}.log"


class CoordinatorProcess:
    def __init__(self, proc: asyncio.subprocess.Process, spec: CoordinatorSpec, port: int, log_path: Path) -> None:
        self.proc = proc
        self.spec = spec
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.started = time.monotonic()
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self.exited: asyncio.Task[int] = asyncio.create_task(proc.wait(), name=f"wait {spec.model}")
        self._reader = asyncio.create_task(self._read_output(), name=f"log {spec.model}")

    @classmethod
    async def spawn(cls, llama_server: Path, spec: CoordinatorSpec, port: int, log_root: Path) -> CoordinatorProcess:
        log_path = next_log_path(log_root, spec.model)
        argv = coordinator_argv(llama_server, spec, port)
        try:
            proc = await spawn_group_async(argv, env=coordinator_env(spec))
        except OSError as exc:
            raise CoordinatorExited(f"cannot start {llama_server}: {exc.strerror}") from None
        log.info("coordinator for %s: pid %d on 127.0.0.1:%d over %s (log %s)",
                 spec.model, proc.pid, port, ",".join(spec.endpoints), log_path)
        return cls(proc, spec, port, log_path)

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("ab") as sink:
            sink.write(f"# {' '.join(coordinator_argv(Path('llama-server'), self.spec, self.port))}\n".encode())
            while line := await self.proc.stdout.readline():
                sink.write(line)
                sink.flush()
                self.output.append(line.decode(errors="replace").rstrip())

    def exit_error(self) -> CoordinatorExited:
        code = self.exited.result() if self.exited.done() else None
        how = describe_exit(code) if code is not None else "did not become healthy"
        return CoordinatorExited(f"llama-server for {self.spec.model} {how} (log: {self.log_path})",
                                 detail="\n".join(self.output))

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        """Return once /health answers 200; raise CoordinatorExited on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exited.done():
                await self._drain()
                raise self.exit_error()
            try:
                async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                # Not listening yet, or busy loading: both mean "not yet"; the exit is watched above.
                pass
            await asyncio.wait({self.exited}, timeout=HEALTH_POLL_S)
        await self.stop()
        raise CoordinatorExited(f"llama-server for {self.spec.model} was not healthy within {timeout_s:.0f}s "
                                f"(log: {self.log_path})", detail="\n".join(self.output))

    async def _drain(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            # The last lines say why it died; a pipe held open by a stray child must not hang us.
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=1.0)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        code = await stop_group_async(self.proc, grace_s)
        await self._drain()
        return code

    @property
    def alive(self) -> bool:
        return not self.exited.done()
