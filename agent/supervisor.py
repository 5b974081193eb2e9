"""The one owner of the rpc-server's lifecycle on a worker.

Only `RpcServerSupervisor.run()` changes the state; everyone else sends it a request
(`request("start" | "stop" | "restart")`) and may wait for the state to settle.

    stopped ──start──► starting ──banner complete + socket listening──► running
       ▲                  │ exit / timeout                                │ exit
       │                  ▼                                               ▼
       └──stop── backoff (capped exponential delay) ◄─────────────────────┘
                          │ too many consecutive failures
                          ▼
                        failed   (cause + last lines of output kept)

Readiness is the child's own banner and its listening socket, never a TCP connect: the
rpc-server serves one client at a time, so a probe could starve the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import psutil

from llamafleet.common.changes import ChangeFeed
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.banner import BannerDevice, RpcBanner
from llamafleet.common.process import describe_exit, spawn_group_async, stop_group_async
from llamafleet.common.restart import RestartPolicy
from llamafleet.common.supervised import Supervised, TaskFailure

log = logging.getLogger(__name__)
# How often the loop wakes when nothing happens: bounds watchdog staleness and poll latency.
TICK_S = 0.25
READY_POLL_S = 0.05
OUTPUT_LINES_KEPT = 30
# An output reader that raised (a line longer than the pipe reader's limit, say) reads on after a
# short pause for as long as the child lives: while nobody reads, the rpc-server blocks on its pipe.
OUTPUT_READER_RESTART = RestartPolicy(initial_s=0.05, max_s=1.0, max_failures=1_000_000)


class RpcState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"


SETTLED = frozenset({RpcState.STOPPED, RpcState.RUNNING, RpcState.BACKOFF, RpcState.FAILED})


@dataclass(frozen=True)
class RpcLaunch:
    """How to start the rpc-server right now (the binary may change after a build)."""

    argv: list[str]
    env: dict[str, str]
    port: int
    endpoint: str
    cache_dir: str
    # Why the banner's devices are not the ones this process was given ("" when they are):
    # checked before it counts as running (agent/gpus.py).
    verify: Callable[[Sequence[BannerDevice]], str] = lambda devices: ""
    # (uuid, PCI bus id) of each CUDA device the banner will list, in order; () when unpinned.
    gpu_ids: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RpcServerSnapshot:
    state: RpcState
    index: int = 0  # which of the agent's rpc-servers
    slot: int = 0  # which model slot it serves in (per-device layout: one process per GPU per slot)
    pid: int = 0
    restarts: int = 0
    generation: int = 0
    endpoint: str = ""
    protocol_version: str = ""
    devices: tuple[BannerDevice, ...] = ()
    cache_dir: str = ""
    state_since_unix_ms: int = 0
    last_exit: str = ""
    last_output: tuple[str, ...] = ()
    recent_output: tuple[str, ...] = ()
    next_start_unix_ms: int = 0
    gpu_ids: tuple[tuple[str, str], ...] = ()  # (uuid, PCI bus id) of its CUDA devices, in banner order


def _now_ms() -> int:
    return int(time.time() * 1000)


def _listening_on(pid: int, port: int) -> bool:
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        # Gone or not ours to inspect: not (yet) listening; the exit watch will tell.
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


@dataclass
class _Child:
    proc: asyncio.subprocess.Process
    launch: RpcLaunch
    banner: RpcBanner = field(default_factory=RpcBanner)
    reader: Supervised | None = None
    exited: asyncio.Task[int] | None = None


class RpcServerSupervisor:
    def __init__(
        self,
        launch_factory: Callable[[], RpcLaunch],
        policy: RestartPolicy,
        on_change: Callable[[], None] = lambda: None,
        autostart: bool = True,
        index: int = 0,
        endpoint: str = "",
        slot: int | None = None,
    ) -> None:
        self._launch_factory = launch_factory
        self._policy = policy
        self._on_change = on_change
        self._want_running = autostart
        self._queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        self._requested = 0
        self._handled = 0
        self._changes = ChangeFeed()
        # A stopped slot still says where it would listen: the controller places by endpoint.
        self._snapshot = RpcServerSnapshot(RpcState.STOPPED, index=index, endpoint=endpoint,
                                           slot=index if slot is None else slot, state_since_unix_ms=_now_ms())
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._failures = 0
        self._child: _Child | None = None
        self._command_task: asyncio.Task[tuple[int, str]] | None = None
        # Monotonic time of the loop's last turn: the watchdog pings only while this is fresh.
        self.last_tick = time.monotonic()

    # ---- what others may call -------------------------------------------------------------

    def snapshot(self) -> RpcServerSnapshot:
        return dataclasses.replace(self._snapshot, recent_output=tuple(self._output))

    def at_rest(self) -> bool:
        """Running, given up (failed), or stopped on purpose: nothing more will happen by itself."""
        state = self._snapshot.state
        return state in (RpcState.RUNNING, RpcState.FAILED) or (state == RpcState.STOPPED and not self._want_running)

    def request(self, action: str) -> int:
        """Queue 'start', 'stop' or 'restart'; returns a ticket for `wait_settled`."""
        if action not in ("start", "stop", "restart"):
            raise ValueError(f"unknown action {action!r}")
        self._requested += 1
        self._queue.put_nowait((self._requested, action))
        return self._requested

    async def wait_settled(self, ticket: int, timeout_s: float) -> RpcServerSnapshot:
        """Wait until the request `ticket` was handled and the state is settled (or timeout)."""
        deadline = time.monotonic() + timeout_s
        while not (self._handled >= ticket and self._snapshot.state in SETTLED):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self._changes.wait_newer(self._changes.version, remaining)
        return self._snapshot

    def loop_failed(self, failure: TaskFailure, exc: Exception) -> None:
        """`run()` raised what nobody expected (its `finally` stopped the child): say so in the state
        `status` shows, until its supervisor (common/supervised.py) runs it again after a delay."""
        why = f"the supervisor's loop failed: {failure.cause}"
        if failure.retry_in_s is None:
            self._set(RpcState.FAILED, pid=0, last_exit=f"{why} (not retried)")
            return
        self._set(RpcState.BACKOFF, pid=0, last_exit=why,
                  next_start_unix_ms=_now_ms() + int(failure.retry_in_s * 1000))
        # Waiting out a back-off is not a wedged loop: the watchdog judges it from when it is due.
        self.last_tick = time.monotonic() + failure.retry_in_s

    # ---- the owner --------------------------------------------------------------------------

    def _set(self, state: RpcState, **changes: object) -> None:
        old = self._snapshot
        values = {**old.__dict__, **changes, "state": state}
        if state != old.state:
            values["state_since_unix_ms"] = _now_ms()
            # The first keeps its old line ("rpc-server starting → running"): journals are grepped.
            name = "rpc-server" if old.index == 0 else f"rpc-server #{old.index}"
            log.info("%s %s → %s", name, old.state.value, state.value)
        self._snapshot = RpcServerSnapshot(**values)
        self._changes.bump()
        self._on_change()

    async def _next_command(self, timeout_s: float) -> tuple[int, str] | None:
        if self._command_task is None:
            self._command_task = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._command_task}, timeout=timeout_s)
        self.last_tick = time.monotonic()
        if not done:
            return None
        command = self._command_task.result()
        self._command_task = None
        self._handled = command[0]
        return command

    async def run(self) -> None:
        """The supervision loop; runs until cancelled, and then stops the child (SIGTERM, grace, SIGKILL)."""
        try:
            while True:
                if not self._want_running:
                    if self._snapshot.state not in (RpcState.STOPPED, RpcState.FAILED):
                        self._set(RpcState.STOPPED, pid=0)
                    command = await self._next_command(TICK_S)
                    if command and command[1] in ("start", "restart"):
                        self._want_running = True
                        self._failures = 0
                        # Before the next await: a waiter must not see the old settled state.
                        self._set(RpcState.STARTING, pid=0)
                    continue
                await self._run_child()
        finally:
            if self._child is not None:
                await self._stop_child()

    async def _run_child(self) -> None:
        try:
            launch = self._launch_factory()
        except LlamafleetError as exc:
            # No binary to run (no build yet): retrying will not help until something changes.
            self._want_running = False
            self._set(RpcState.FAILED, pid=0, last_exit=exc.message, last_output=())
            return
        self._output.clear()
        proc = await spawn_group_async(launch.argv, env=launch.env)
        child = _Child(proc, launch)
        child.reader = Supervised(f"output reader of rpc-server #{self._snapshot.index} (pid {proc.pid})",
                                  lambda: self._read_output(child), restart=OUTPUT_READER_RESTART)
        child.exited = asyncio.ensure_future(proc.wait())
        self._child = child
        self._set(
            RpcState.STARTING, pid=proc.pid, generation=self._snapshot.generation + 1,
            endpoint=launch.endpoint, cache_dir=launch.cache_dir, protocol_version="", devices=(),
            next_start_unix_ms=0, gpu_ids=launch.gpu_ids,
        )
        became_ready_at = await self._wait_ready(child)
        if became_ready_at is None:
            return
        await self._watch_running(child, became_ready_at)

    async def _read_output(self, child: _Child) -> None:
        assert child.proc.stdout is not None
        async for raw in child.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._output.append(line)
            child.banner.feed(line)
            log.info("rpc-server[%d]: %s", child.proc.pid, line)

    async def _wait_ready(self, child: _Child) -> float | None:
        """Until banner + socket (→ ready time), exit, timeout, or a stop/restart (→ None)."""
        deadline = time.monotonic() + self._policy.start_timeout_s
        assert child.exited is not None
        while True:
            if child.exited.done():
                await self._after_exit(child, ready_at=None)
                return None
            banner = child.banner
            if banner.devices and _listening_on(child.proc.pid, child.launch.port):
                banner.end_devices()
            if banner.complete and _listening_on(child.proc.pid, child.launch.port):
                if problem := child.launch.verify(banner.devices):
                    await self._refuse_devices(child, problem)
                    return None
                self._set(
                    RpcState.RUNNING, protocol_version=banner.protocol_version,
                    devices=tuple(banner.devices), last_output=(),
                )
                return time.monotonic()
            if time.monotonic() > deadline:
                log.warning("rpc-server gave no banner and socket in %.0f s; stopping it", self._policy.start_timeout_s)
                await stop_group_async(child.proc)
                await self._after_exit(child, ready_at=None, cause=f"not ready within {self._policy.start_timeout_s:.0f} s")
                return None
            command = await self._next_command(READY_POLL_S)
            if command and await self._handle_while_alive(command[1]):
                return None

    async def _refuse_devices(self, child: _Child, problem: str) -> None:
        """Its devices are not the ones it was given: stop it for good (a restart sees the same)."""
        log.error("rpc-server (pid %d): %s", child.proc.pid, problem)
        await stop_group_async(child.proc)
        await self._drain(child)
        self._child = None
        self._want_running = False
        self._set(RpcState.FAILED, pid=0, last_exit=problem, last_output=tuple(self._output),
                  protocol_version=child.banner.protocol_version, devices=tuple(child.banner.devices))

    async def _watch_running(self, child: _Child, ready_at: float) -> None:
        assert child.exited is not None
        while True:
            if child.exited.done():
                await self._after_exit(child, ready_at=ready_at)
                return
            command = await self._next_command(TICK_S)
            if command and await self._handle_while_alive(command[1]):
                return
            if self._failures and time.monotonic() - ready_at >= self._policy.healthy_reset_s:
                self._failures = 0

    async def _handle_while_alive(self, action: str) -> bool:
        """Apply stop/restart to a live child; True when the child was stopped."""
        if action == "start":
            return False
        await self._stop_child()
        self._failures = 0
        if action == "stop":
            self._want_running = False
            self._set(RpcState.STOPPED, pid=0)
        return True

    async def _stop_child(self) -> None:
        child = self._child
        if child is None:
            return
        self._set(RpcState.STOPPING)
        code = await stop_group_async(child.proc)
        await self._drain(child)
        self._set(RpcState.STOPPING, pid=0, last_exit=f"stopped on request ({describe_exit(code)})")
        self._child = None

    async def _drain(self, child: _Child) -> None:
        if child.reader is not None:
            with contextlib.suppress(TimeoutError):
                # A grandchild holding the pipe open must not hang us: the group is dead anyway.
                await asyncio.wait_for(child.reader.task, timeout=2)

    async def _after_exit(self, child: _Child, ready_at: float | None, cause: str = "") -> None:
        """The child ended on its own: record why, then back off or give up."""
        assert child.exited is not None
        code = child.exited.result()
        await self._drain(child)
        self._child = None
        if ready_at is not None and time.monotonic() - ready_at >= self._policy.healthy_reset_s:
            self._failures = 0
        self._failures += 1
        reason = cause or describe_exit(code)
        if ready_at is None and not cause:
            reason += " before it was ready"
        tail = tuple(self._output)
        log.warning("rpc-server (pid %d) %s; last output: %s", child.proc.pid, reason, " | ".join(tail[-5:]))
        if self._failures >= self._policy.max_failures:
            self._want_running = False
            self._set(RpcState.FAILED, pid=0, last_exit=f"{reason} ({self._failures} failures in a row, giving up)",
                      last_output=tail)
            return
        delay = self._policy.delay(self._failures)
        self._set(RpcState.BACKOFF, pid=0, last_exit=reason, last_output=tail,
                  next_start_unix_ms=_now_ms() + int(delay * 1000))
        deadline = time.monotonic() + delay
        while (remaining := deadline - time.monotonic()) > 0:
            command = await self._next_command(min(remaining, TICK_S))
            if command is None:
                continue
            if command[1] == "stop":
                self._want_running = False
                self._set(RpcState.STOPPED, next_start_unix_ms=0)
                return
            self._failures = 0  # an explicit start/restart skips the wait
            break
        self._set(RpcState.STARTING, pid=0, restarts=self._snapshot.restarts + 1)
