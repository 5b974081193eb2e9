"""Long-lived coroutines under watch: no silent death, no hot loop.

Every coroutine that lives as long as its owner (a deployment's lifecycle, a node's watcher, a
log reader, a periodic checker) runs in a `Supervised`. When it raises something nobody
expected, the supervisor

- logs it once with its traceback (a repeat of the same cause gets one line, not another trace),
- records an event (`task.failed`, with the cause and when it is tried again),
- tells the owner through `on_failure`, which moves the owner to its typed failed state,
- and, with a `RestartPolicy`, runs it again after the policy's capped exponential delay;
  without one (or once the policy gives up) it stays failed until its owner starts a new one.

Cancelling is how an owner tells its task to end; a coroutine that returns has ended on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from llamafleet.common.restart import RestartPolicy

log = logging.getLogger(__name__)
# For a task that must run as long as its owner (a watcher, a read-ahead): tried again, never given up.
RETRY_FOREVER = RestartPolicy(initial_s=0.5, max_s=30.0, max_failures=2**62, healthy_reset_s=60.0)


class EventSink(Protocol):
    """Where a supervisor records a failure (the controller's event log; nothing in the agent)."""

    def __call__(self, kind: str, subject: str, message: str, **data: Any) -> None: ...


def _no_events(kind: str, subject: str, message: str, **data: Any) -> None:
    """The sink of an owner that keeps no event log."""


@dataclass(frozen=True)
class TaskFailure:
    """Why a supervised coroutine ended when nobody asked it to."""

    cause: str  # one line: the exception's type and message
    at_unix: float
    in_a_row: int  # failures since it last ran healthy (or was started)
    retry_in_s: float | None  # None: not tried again by the supervisor

    def to_json(self) -> dict[str, Any]:
        return {"cause": self.cause, "at_unix": self.at_unix, "in_a_row": self.in_a_row,
                "retry_in_s": self.retry_in_s}


def describe_exception(exc: BaseException) -> str:
    """`OSError: [Errno 28] No space left on device`: what a person reads first."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Supervised:
    """Run `body()` as a task named `name`, watched as the module docstring says.

    `on_failure(failure, exc)` runs on the event loop's thread before any retry; whatever it
    raises is logged, never lost and never fatal to the supervisor."""

    def __init__(self, name: str, body: Callable[[], Coroutine[Any, Any, None]], *,
                 on_failure: Callable[[TaskFailure, Exception], None] | None = None,
                 restart: RestartPolicy | None = None, events: EventSink = _no_events,
                 subject: str | None = None) -> None:
        self.name = name
        self.failure: TaskFailure | None = None  # the last unexpected end, until it runs healthy again
        self.failures = 0  # every unexpected end since it was made
        self._body = body
        self._on_failure = on_failure
        self._restart = restart
        self._events = events
        self._subject = subject or name
        self.task: asyncio.Task[None] = asyncio.create_task(self._supervise(), name=name)

    @property
    def running(self) -> bool:
        return not self.task.done()

    def add_done_callback(self, callback: Callable[[asyncio.Task[None]], object]) -> None:
        self.task.add_done_callback(callback)

    def cancel(self) -> None:
        self.task.cancel()

    async def stop(self) -> None:
        """Cancel it and wait until it has ended (its `finally` blocks have run)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            # Cancelling is how a supervised task is told to end.
            await self.task

    async def _supervise(self) -> None:
        in_a_row = 0
        last_cause = ""
        while True:
            started = time.monotonic()
            try:
                await self._body()
                return
            except Exception as exc:  # noqa: BLE001 - the one place that catches what nobody expected
                if self._restart is not None and time.monotonic() - started >= self._restart.healthy_reset_s:
                    in_a_row = 0
                in_a_row += 1
                self.failures += 1
                retry = self._restart is not None and in_a_row < self._restart.max_failures
                delay = self._restart.delay(in_a_row) if retry and self._restart is not None else None
                cause = describe_exception(exc)
                self.failure = TaskFailure(cause, time.time(), in_a_row, delay)
                self._report(exc, cause, cause != last_cause, delay)
                last_cause = cause
                if delay is None:
                    return
            await asyncio.sleep(delay)

    def _report(self, exc: Exception, cause: str, new_cause: bool, delay: float | None) -> None:
        then = f"; retrying in {delay:.1f}s" if delay is not None else "; not retried"
        if new_cause:
            log.error("%s failed unexpectedly: %s%s", self.name, cause, then, exc_info=exc)
        else:
            # The same cause again: its traceback is in the log already.
            log.error("%s failed again: %s%s", self.name, cause, then)
        assert self.failure is not None
        for hook in (self._record_event, self._tell_owner):
            try:
                hook(exc)
            except Exception as hook_exc:  # noqa: BLE001 - a broken hook must not kill the supervisor
                log.error("%s: reporting its failure failed too: %r", self.name, hook_exc, exc_info=hook_exc)

    def _record_event(self, exc: Exception) -> None:
        assert self.failure is not None
        self._events("task.failed", self._subject, f"{self.name} failed: {self.failure.cause}",
                     task=self.name, **self.failure.to_json())

    def _tell_owner(self, exc: Exception) -> None:
        if self._on_failure is not None:
            assert self.failure is not None
            self._on_failure(self.failure, exc)
