"""The fleet's event log: every state change, kept in SQLite (bounded) and streamed live.

Kinds: `node.ready`, `node.unreachable`, `node.maintenance`, `node.added`, `node.removed`,
`rpc.restarted` (with the agent's cause), `coordinator.<state>` (starting, ready, stopping,
stopped, failed, with the cause), `placement` (where a model went), `placement.failed` (why not),
`auth.refused` (a request the HTTP guard turned away: route, peer, reason; never the key),
`stage`, `stage.failed` (pre-staging: before a load, or after a pull with `after_pull`), `pull`
(a node's transfer begins), `pull.done` (pulled or held already), `pull.failed` (the cause).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llamafleet.controller.store import Store

log = logging.getLogger(__name__)
DEFAULT_RETENTION = 10_000
PRUNE_EVERY = 100
SUBSCRIBER_QUEUE = 1000


class EventSink(Protocol):
    def __call__(self, kind: str, subject: str, message: str, **data: Any) -> None: ...


def no_events(kind: str, subject: str, message: str, **data: Any) -> None:
    """The sink of a component nobody listens to (unit tests, tools)."""


@dataclass(frozen=True)
class Event:
    id: int
    at_ms: int
    kind: str
    subject: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "at_ms": self.at_ms, "kind": self.kind, "subject": self.subject,
                "message": self.message, "data": self.data}


class EventLog:
    def __init__(self, store: Store, retention: int = DEFAULT_RETENTION) -> None:
        self._store = store
        self._retention = retention
        self._since_prune = 0
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._listeners: list[Callable[[Event], None]] = []
        # Ids are given here, not by SQLite, so that an event that could not be stored still has
        # one, in order, for the live streams.
        self._last_id = store.last_event_id()
        self.write_failures = 0  # events that could not be stored (a full or read-only disk)
        self.write_error = ""  # the last reason ("" while none failed)

    def record(self, kind: str, subject: str, message: str, **data: Any) -> None:
        """Store and deliver one event. Never raises: a state change is not undone because its
        record could not be written; the live streams and metrics still get it."""
        at_ms = int(time.time() * 1000)
        self._last_id += 1
        event = Event(self._last_id, at_ms, kind, subject, message, data)
        log.debug("event %s %s: %s", kind, subject, message)
        self._store_event(event)
        for listener in self._listeners:
            listener(event)
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                # A reader that fell this far behind misses events; it can re-read the log.
                queue.put_nowait(event)

    def _store_event(self, event: Event) -> None:
        try:
            self._store.add_event(event.id, event.at_ms, event.kind, event.subject, event.message, event.data)
            self._since_prune += 1
            if self._since_prune >= PRUNE_EVERY:
                self._store.prune_events(self._retention)
                self._since_prune = 0
        except sqlite3.Error as exc:
            self.write_failures += 1
            if str(exc) != self.write_error:
                # Once per cause, not per event: a full disk would otherwise fill the journal too.
                log.error("cannot store events in %s: %s; they are still streamed, not kept",
                          self._store.path, exc)
            self.write_error = str(exc)

    def recent(self, after_id: int = 0, limit: int = 200) -> list[Event]:
        return [Event(*row) for row in self._store.events(after_id, limit)]

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call `listener` with every event as it is recorded (metrics count from here)."""
        self._listeners.append(listener)

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)
