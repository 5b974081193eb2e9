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
from typing import BinaryIO, Protocol

import aiohttp
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.process import (
    STOP_GRACE_S,
    describe_exit,
    spawn_group_async,
    stop_group_async,
)
from llamafleet.common.llamacpp.server_command import RPC_BACKEND_LOST
from llamafleet.common.restart import RestartPolicy
from llamafleet.common.supervised import Supervised
from llamafleet.controller.coordinator.command import (
    CoordinatorSpec,
    coordinator_argv,
    coordinator_env,
)

log = logging.getLogger(__name__)
HEALTH_POLL_S = 0.1
OUTPUT_LINES_KEPT = 30
LOGS_KEPT_PER_MODEL = 10
# A log reader that raised what nobody expected reads on after a short pause, for as long as the
# process lives: while nobody reads, llama-server blocks on its full pipe.
# A log that cannot be written is tried again this often (not at every line of a chatty child).
LOG_RETRY_S = 1.0
LOG_READER_RESTART = RestartPolicy(initial_s=0.05, max_s=1.0, max_failures=1_000_000)


class Coordinator(Protocol):
    """What a deployment needs of its coordinator, wherever it runs: `CoordinatorProcess` here, or
    `remote.RemoteCoordinator` on a worker."""

    spec: CoordinatorSpec
    url: str
    output: deque[str]
    backend_lost: bool
    log_lines_lost: int
    log_error: str

    @property
    def exited(self) -> asyncio.Future[int]: ...
    @property
    def log_path(self) -> Path | None: ...
    @property
    def pid(self) -> int: ...
    @property
    def alive(self) -> bool: ...
    def exit_error(self) -> CoordinatorExited: ...
    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None: ...
    async def drain(self) -> None: ...
    async def stop(self, grace_s: float = STOP_GRACE_S) -> int: ...


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
    def __init__(self, proc: asyncio.subprocess.Process, spec: CoordinatorSpec, port: int,
                 log_path: Path | None, log_error: str = "") -> None:
        self.proc = proc
        self.spec = spec
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path  # None: no log file could be made (the output is still read)
        self.started = time.monotonic()
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self.backend_lost = False  # llama.cpp said an rpc-server went away (RPC_BACKEND_LOST)
        # Lines read but not written to the log (a full or read-only disk); the child never waits for them.
        self.log_lines_lost = 0
        self.log_error = log_error  # the last reason a log write failed ("" while none did)
        self._log_started = False
        self.exited: asyncio.Task[int] = asyncio.create_task(proc.wait(), name=f"wait {spec.model}")
        self._reader = Supervised(f"log reader of {spec.model}", self._read_output, restart=LOG_READER_RESTART)

    @classmethod
    async def spawn(cls, llama_server: Path, spec: CoordinatorSpec, port: int, log_root: Path) -> CoordinatorProcess:
        log_path: Path | None = None
        log_error = ""
        try:
            log_path = await asyncio.to_thread(next_log_path, log_root, spec.model)
        except OSError as exc:
            # The log is best effort: a full or read-only disk must not keep a model from loading.
            log_error = f"cannot make a log file in {log_root}: {exc.strerror or exc}"
            log.warning("coordinator for %s: %s; its output is kept in memory only", spec.model, log_error)
        argv = coordinator_argv(llama_server, spec, port)
        try:
            proc = await spawn_group_async(argv, env=coordinator_env(spec))
        except OSError as exc:
            raise CoordinatorExited(f"cannot start {llama_server}: {exc.strerror}") from None
        log.info("coordinator for %s: pid %d on 127.0.0.1:%d over %s (log %s)",
                 spec.model, proc.pid, port, ",".join(spec.endpoints), log_path)
        return cls(proc, spec, port, log_path, log_error)

    async def _read_output(self) -> None:
        """Read every line llama-server prints until it closes its output, whatever the disk does.

        llama-server blocks once the pipe is full, mid-answer: so the pipe is always drained, and
        a line that cannot be written is counted (`ps` shows it) rather than ending the reader.
        The log is opened again at most every LOG_RETRY_S, so a disk with room again gets it back."""
        assert self.proc.stdout is not None
        sink = self._open_log() if self.log_path is not None else None
        retry_at = time.monotonic() + LOG_RETRY_S
        try:
            while line := await self.proc.stdout.readline():
                text = line.decode(errors="replace").rstrip()
                self.output.append(text)
                if RPC_BACKEND_LOST in text:
                    self.backend_lost = True
                if sink is None and self.log_path is not None and time.monotonic() >= retry_at:
                    retry_at = time.monotonic() + LOG_RETRY_S
                    sink = self._open_log()
                if sink is None:
                    self.log_lines_lost += 1
                    continue
                try:
                    # Unbuffered: one small write per line, nothing left to flush on the loop.
                    sink.write(line)
                except OSError as exc:
                    self.log_lines_lost += 1
                    self._log_failed(exc)
                    sink = self._closed(sink)
        finally:
            if sink is not None:
                self._closed(sink)

    def _open_log(self) -> BinaryIO | None:
        assert self.log_path is not None
        sink: BinaryIO | None = None
        try:
            sink = self.log_path.open("ab", buffering=0)
            if not self._log_started:
                sink.write(f"# {' '.join(coordinator_argv(Path('llama-server'), self.spec, self.port))}\n".encode())
                self._log_started = True
            elif self.log_lines_lost:
                sink.write(f"# {self.log_lines_lost} line(s) lost so far: {self.log_error}\n".encode())
            return sink
        except OSError as exc:
            self._log_failed(exc)
            return self._closed(sink) if sink is not None else None

    @staticmethod
    def _closed(sink: BinaryIO) -> None:
        with contextlib.suppress(OSError):
            # Nothing is buffered; a close that fails has nothing left to lose.
            sink.close()

    def _log_failed(self, exc: OSError) -> None:
        first = not self.log_error
        self.log_error = f"writing {self.log_path} failed: {exc.strerror or exc}"
        if first:
            log.warning("coordinator for %s: %s; its output is still read, and lost lines are counted",
                        self.spec.model, self.log_error)

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

    async def drain(self) -> None:
        """Wait (briefly) until every line the process printed has been read."""
        await self._drain()

    async def _drain(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            # The last lines say why it died; a pipe held open by a stray child must not hang us.
            await asyncio.wait_for(asyncio.shield(self._reader.task), timeout=1.0)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        code = await stop_group_async(self.proc, grace_s)
        await self._drain()
        return code

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    @property
    def pid(self) -> int:
        return self.proc.pid
