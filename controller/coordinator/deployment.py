"""One model's coordinator: the single owner of its lifecycle state.

Only `Deployment._lifecycle()` changes the state (a variant of `states.Phase`, each move checked
against `states.TRANSITIONS`); requests ask for the model (`acquire`),
hand it back (`release`, with Ollama's keep-alive), or ask for it to go (`unload`).

    stopped ──acquire──► starting ──/health 200──► ready ──idle past keep-alive / unload──► stopping ──► stopped
                            ▲  │ exit, timeout                │ exit, backend rpc-server restarted,
                            │  ▼                              │ requests need more context
                            └──── backoff (capped, exponential) ◄┘
                                   │ too many failures in a row
                                   ▼
                                 failed (the cause and the last lines kept; the next request tries again)

The lifecycle runs supervised (common/supervised.py): anything it raises that nobody expected
(a full disk, a bug) is logged once with its traceback, recorded, releases what was placed, and
leaves the deployment `failed` with the cause; the requests waiting get that cause as their
error, and only the next request tries again: never a hot loop of placements.

A backend whose rpc-server generation changed holds none of our tensors any more, so the
coordinator is restarted (re-placed) as soon as the agent reports it, not when a user's request
finds out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.common.process import STOP_GRACE_S
from llamafleet.common.restart import RestartPolicy
from llamafleet.controller.coordinator.command import CoordinatorSpec
from llamafleet.common.supervised import Supervised, TaskFailure
from llamafleet.controller.coordinator.process import (
    Coordinator,
    CoordinatorExited,
    CoordinatorProcess,
)
from llamafleet.controller.coordinator.states import (
    BackingOff,
    CoordinatorState,
    Failed,
    Loading,
    Phase,
    Placing,
    Ready,
    Stopped,
    Stopping,
    check_transition,
)
from llamafleet.controller.events import EventSink, no_events

log = logging.getLogger(__name__)
# How often a ready coordinator's backends and idle deadline are checked when nothing wakes it.
TICK_S = 0.25
# A coordinator whose backend lost its tensors can only fail; requests stuck on the dead
# connection would hold a graceful stop for the whole grace, so it gets a short one.
BROKEN_STOP_GRACE_S = 0.5


class DoesNotFit(LlamafleetError):
    """No set of ready workers holds the model now (the message is the plan's reason)."""


class ShuttingDown(LlamafleetError):
    """The controller is stopping: it starts no coordinator any more (503)."""


class Placer(Protocol):
    """What a deployment asks of the fleet: where to go, and whether its backends still hold it."""

    async def place(self, model: str, ctx: int) -> CoordinatorSpec: ...
    def check(self, model: str, ctx: int) -> DoesNotFit | None: ...
    def release(self, model: str) -> None: ...
    def backends_changed(self, spec: CoordinatorSpec) -> str | None: ...


@dataclass(frozen=True)
class Runtime:
    """What every coordinator is started with."""

    llama_server: Callable[[], Awaitable[Path]]  # raises LlamafleetError when the controller has no build
    log_root: Path
    session: aiohttp.ClientSession
    policy: RestartPolicy
    events: EventSink = no_events
    # Starts a coordinator on the worker a plan put it on (controller/coordinator/remote.py).
    start_remote: Callable[[CoordinatorSpec], Awaitable[Coordinator]] | None = None


@dataclass(frozen=True)
class Lease:
    """A request's hold on a ready coordinator; it is not unloaded while a lease is out."""

    url: str
    incarnation: int
    load_duration_s: float  # how long this request waited for a load (0 when it was ready)


@dataclass(frozen=True)
class _StopReason:
    kind: str  # unload, exit, backends, broken, ctx
    message: str


class Deployment:
    def __init__(self, model: str, placer: Placer, runtime: Runtime, default_keep_alive_s: float) -> None:
        self.model = model
        self._placer = placer
        self._runtime = runtime
        self.default_keep_alive_s = default_keep_alive_s
        self.phase: Phase = Stopped()
        self.state_since = time.time()
        self.incarnation = 0  # +1 per healthy start
        self.restarts = 0  # unplanned restarts
        self.last_exit = ""
        self.last_output: tuple[str, ...] = ()
        self.load_duration_s = 0.0
        self.active = 0  # leases out
        self.waiting = 0  # requests waiting for a load
        self.last_used = time.monotonic()
        self.expires_at: float | None = None  # monotonic; None: never (or in use)
        self.closing = False  # the controller is stopping: nothing starts again
        self._wanted = False
        self._unload_reason = ""
        self._want_ctx = 0
        self._broken_incarnation = 0
        self._attempt = 0
        self._failure: LlamafleetError | None = None
        self._failure_attempt = 0
        self._task: Supervised | None = None
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()

    # ---- what the phase says ------------------------------------------------------------------

    @property
    def state(self) -> CoordinatorState:
        return self.phase.kind

    @property
    def detail(self) -> str:
        return self.phase.detail

    @property
    def spec(self) -> CoordinatorSpec | None:
        return self.phase.spec if isinstance(self.phase, (Loading, Ready, Stopping)) else None

    @property
    def process(self) -> Coordinator | None:
        return self.phase.process if isinstance(self.phase, (Loading, Ready, Stopping)) else None

    # ---- requests -----------------------------------------------------------------------------

    async def acquire(self, ctx: int, *, after_incarnation: int = 0) -> Lease:
        """Wait until the model is ready with at least `ctx` per slot, loading it if needed."""
        started = time.monotonic()
        loaded = False
        self.waiting += 1
        try:
            while (ready := self._usable(ctx, after_incarnation)) is None:
                attempt = self._want(ctx)
                loaded = True
                changed = self._changed
                await changed.wait()
                if self._failure is not None and self._failure_attempt >= attempt:
                    raise self._failure
        finally:
            self.waiting -= 1
        self.active += 1
        self.expires_at = None
        return Lease(ready.process.url, ready.incarnation, time.monotonic() - started if loaded else 0.0)

    async def refresh(self, lease: Lease, ctx: int) -> Lease:
        """`lease` if its coordinator is still the live one, else the one that replaced it.

        A request that waited for a turn at the slots may find its coordinator restarted
        meanwhile; it keeps its hold on the model throughout (the caller's `release` balances).
        """
        if lease.incarnation == self.incarnation and self._usable(ctx, 0) is not None:
            return lease
        self.active -= 1
        try:
            fresh = await self.acquire(ctx, after_incarnation=0)
        except BaseException:
            self.active += 1  # still held, as the caller believes: its release() undoes it
            raise
        return Lease(fresh.url, fresh.incarnation, lease.load_duration_s + fresh.load_duration_s)

    def release(self, keep_alive_s: float | None = None) -> None:
        """A request is done; the model stays `keep_alive_s` (negative: forever; 0: unload now)."""
        self.active -= 1
        self.last_used = time.monotonic()
        keep = self.default_keep_alive_s if keep_alive_s is None else keep_alive_s
        if self.active == 0:
            self.expires_at = None if keep < 0 else self.last_used + keep
            if keep == 0:
                self._wake.set()

    def report_broken(self, incarnation: int) -> None:
        """A request found this incarnation unusable (connection refused, reset): restart it."""
        if incarnation == self.incarnation and isinstance(self.phase, Ready):
            self._broken_incarnation = incarnation
            self._wake.set()

    async def unload(self, reason: str = "unloaded on request") -> None:
        """Stop the coordinator (cutting requests in flight) and wait until it is stopped."""
        self._wanted = False
        self._want_ctx = 0
        self._unload_reason = reason
        self._wake.set()
        while self.running:
            changed = self._changed
            await changed.wait()

    async def close(self) -> None:
        """The controller is stopping: unload, and refuse every later request (nothing starts again)."""
        self.closing = True
        await self.unload("the controller is stopping")

    @property
    def idle(self) -> bool:
        return self.active == 0 and self.waiting == 0

    @property
    def running(self) -> bool:
        return self._task is not None and self._task.running

    # ---- the owner --------------------------------------------------------------------------------

    def _usable(self, ctx: int, after_incarnation: int) -> Ready | None:
        ready = self.phase
        if (isinstance(ready, Ready) and ready.process.alive and ready.spec.ctx_per_slot >= ctx
                and ready.incarnation > after_incarnation and self._broken_incarnation != ready.incarnation):
            return ready
        return None

    def _want(self, ctx: int) -> int:
        if self.closing:
            raise ShuttingDown(f"not loading {self.model}: the controller is stopping")
        self._wanted = True
        self._unload_reason = ""
        self._want_ctx = max(self._want_ctx, ctx)
        if not self.running:
            self._attempt += 1
            self._failure = None
            self._task = Supervised(f"coordinator {self.model}", self._lifecycle, on_failure=self._crashed,
                                    events=self._runtime.events, subject=self.model)
        self._wake.set()
        return self._attempt

    def _set(self, phase: Phase) -> None:
        check_transition(self.phase, phase)
        old, self.phase = self.phase, phase
        self._notify()
        if phase.kind is not old.kind:
            log.info("coordinator %s: %s → %s%s", self.model, old.kind.value, phase.kind.value,
                     f" ({phase.detail})" if phase.detail else "")
            self.state_since = time.time()
            spec = self.spec
            self._runtime.events(f"coordinator.{phase.kind.value}", self.model, phase.detail or phase.kind.value,
                                 backends=spec.endpoints if spec else [], restarts=self.restarts,
                                 pid=self.process.pid if self.process else None)

    def _notify(self) -> None:
        """Wake every request waiting on this deployment, to look at its phase again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _fail(self, exc: LlamafleetError, phase: Stopped | Failed) -> None:
        self._failure = exc
        self._failure_attempt = self._attempt
        self._wanted = False
        self._want_ctx = 0
        self._set(phase)

    def _crashed(self, failure: TaskFailure, exc: Exception) -> None:
        """The supervisor's report: the lifecycle raised what nobody expected (it has cleaned up)."""
        cause = f"the coordinator for {self.model} failed: {failure.cause}"
        self._fail(LlamafleetError(cause), Failed(cause))

    async def _lifecycle(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            await self._clean_up()
            self._set(Stopped("the controller is stopping"))
            raise
        except BaseException:
            await self._clean_up()  # then the supervisor reports it, and `_crashed` says failed
            raise

    async def _clean_up(self) -> None:
        """Never leave a process behind, nor memory promised to one."""
        process = self.process
        if process is not None and process.alive:
            await asyncio.shield(process.stop())
        self._placer.release(self.model)

    async def _run(self) -> None:
        failures = 0
        # After an unplanned end a refusal to place is worth retrying (a backend is coming
        # back); on a first load it is the answer, given at once.
        restarting = False
        while self._wanted:
            self._set(Placing(self._want_ctx))
            try:
                spec = await self._placer.place(self.model, self._want_ctx)
            except DoesNotFit as exc:
                self._placer.release(self.model)
                if not restarting:
                    self._fail(exc, Stopped(exc.message))
                    return
                failures += 1
                if not await self._back_off_or_fail(failures, exc):
                    return
                continue
            except LlamafleetError as exc:
                # The model file went away, or the state cannot be written: nothing a retry fixes.
                self._placer.release(self.model)
                self._fail(exc, Stopped(exc.message))
                return
            if not self._wanted:
                # Unloaded while it was being placed (pre-staging can take minutes): do not
                # start a load only to stop it.
                self._placer.release(self.model)
                continue
            loading_since = time.monotonic()
            try:
                process = await self._spawn(spec)
                self._set(Loading(spec, process))
                await process.wait_ready(self._runtime.session, self._runtime.policy.start_timeout_s)
            except LlamafleetError as exc:
                self._placer.release(self.model)
                if not isinstance(exc, CoordinatorExited):
                    self._fail(exc, Stopped(exc.message))  # no llama.cpp build: a retry fixes nothing
                    return
                self._record_exit(exc)
                failures += 1
                restarting = True
                if not await self._back_off_or_fail(failures, exc):
                    return
                continue
            self.load_duration_s = time.monotonic() - loading_since
            self.incarnation += 1
            if restarting:
                self.restarts += 1
            ready_at = time.monotonic()
            self._set(Ready(spec, process, self.incarnation))
            reason = await self._watch(process, spec)
            self._set(Stopping(spec, process, reason.message))
            if process.alive:
                await process.stop(BROKEN_STOP_GRACE_S if reason.kind in ("backends", "broken") else STOP_GRACE_S)
            else:
                self._record_exit(process.exit_error())
                # Ended on its own: what is left of it goes too (a stray in its process group; on a
                # worker, the agent's record of the exit, and the rpc-servers it may still hold).
                await process.stop()
            if (time.monotonic() - ready_at >= self._runtime.policy.healthy_reset_s or reason.kind == "backends"
                    or process.backend_lost):
                # Healthy for a while, or it was ready and lost an rpc-server under it (whoever noticed
                # first: the agent, llama.cpp's abort, a request): that is the worker's failure (the
                # agent bounds its restarts), not a crash loop of ours.
                failures = 0
            self._placer.release(self.model)
            if reason.kind in ("unload", "ctx"):
                restarting = False
                continue  # planned: a request that came meanwhile may want it back
            log.warning("coordinator %s: restarting: %s", self.model, reason.message)
            failures += 1
            restarting = True
            # The coordinator's failure, as a start that failed is: a 503 naming it, not a 500.
            error = CoordinatorExited(f"coordinator for {self.model} failed {failures} times in a row; "
                                      f"last: {reason.message}")
            if not await self._back_off_or_fail(failures, error, reason.message):
                return
        self._set(Stopped(self.phase.reason if isinstance(self.phase, Stopping) else ""))

    async def _spawn(self, spec: CoordinatorSpec) -> Coordinator:
        """Start its coordinator where the plan put it: on a worker (through its agent), or here."""
        if spec.local is not None:
            if self._runtime.start_remote is None:
                raise LlamafleetError(f"{self.model} was placed on a worker, and this controller cannot start one there")
            return await self._runtime.start_remote(spec)
        return await CoordinatorProcess.spawn(await self._runtime.llama_server(), spec, free_loopback_port(),
                                              self._runtime.log_root)

    async def _back_off_or_fail(self, failures: int, error: LlamafleetError, cause: str | None = None) -> bool:
        """Wait before the next try; False (and `failed`, with `error`) once the policy gives up."""
        if failures >= self._runtime.policy.max_failures:
            self._fail(error, Failed(error.message))
            return False
        await self._backoff(failures, cause or error.message)
        return True

    def _record_exit(self, exc: CoordinatorExited) -> None:
        self.last_exit = exc.message
        self.last_output = tuple(exc.detail.splitlines()[-10:]) if exc.detail else ()
        log.warning("coordinator %s: %s", self.model, exc.message)

    async def _backoff(self, failures: int, cause: str) -> None:
        delay = self._runtime.policy.delay(failures)
        self._set(BackingOff(failures, delay, cause))
        deadline = time.monotonic() + delay
        while self._wanted and (left := deadline - time.monotonic()) > 0:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # Woken early by an unload: stop waiting and let the loop end.
                await asyncio.wait_for(self._wake.wait(), timeout=left)

    async def _watch(self, process: Coordinator, spec: CoordinatorSpec) -> _StopReason:
        """Wait for the first reason to stop this process; its exit wakes us at once."""
        process.exited.add_done_callback(lambda _: self._wake.set())
        while True:
            if not process.alive:
                await process.drain()  # its last lines say whether an rpc-server took it down
                if process.backend_lost:
                    # Aborted by llama.cpp because an rpc-server under it died: a backend's failure
                    # (the agent bounds those), not a crash of the coordinator.
                    return _StopReason("backends", f"an rpc-server failed under it; {process.exit_error().message}")
                return _StopReason("exit", process.exit_error().message)
            if not self._wanted:
                return _StopReason("unload", self._unload_reason or "unloaded")
            if self._broken_incarnation == self.incarnation:
                return _StopReason("broken", self._placer.backends_changed(spec)
                                   or "a request found llama-server unreachable")
            if (why := self._placer.backends_changed(spec)) is not None:
                return _StopReason("backends", why)
            if self._want_ctx > spec.ctx_per_slot and self.active == 0:
                # Only give up a working coordinator for a context that will fit.
                refusal = self._placer.check(self.model, self._want_ctx)
                if refusal is None:
                    return _StopReason("ctx", f"reloading with a context of {self._want_ctx}")
                self._failure, self._failure_attempt = refusal, self._attempt
                self._want_ctx = spec.ctx_per_slot
                self._notify()  # the waiters get the refusal
            if self.idle and self.expires_at is not None and time.monotonic() >= self.expires_at:
                self._wanted = False
                self._want_ctx = 0
                return _StopReason("unload", "keep-alive expired")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                # Nothing woke us within a tick: look at the backends and the clock again.
                await asyncio.wait_for(self._wake.wait(), timeout=TICK_S)
