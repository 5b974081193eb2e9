"""The event log: stored, bounded, delivered to listeners and subscribers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llamafleet.controller.events import PRUNE_EVERY, Event, EventLog
from llamafleet.controller.store import Store


def test_events_are_kept_in_order_and_read_after_an_id(tmp_path: Path) -> None:
    log = EventLog(Store(tmp_path / "db.sqlite3"))
    log.record("node.ready", "10.0.0.2:50051", "node is ready")
    log.record("rpc.restarted", "10.0.0.2:50051", "rpc-server restarted: killed by signal SIGKILL", generation=2)
    first, second = log.recent()
    assert (first.kind, second.kind) == ("node.ready", "rpc.restarted") and second.data == {"generation": 2}
    assert [e.id for e in log.recent(after_id=first.id)] == [second.id]
    assert [e.kind for e in EventLog(Store(tmp_path / "db.sqlite3")).recent()] == ["node.ready", "rpc.restarted"]


def test_retention_bounds_the_table(tmp_path: Path) -> None:
    log = EventLog(Store(tmp_path / "db.sqlite3"), retention=50)
    for n in range(500):
        log.record("placement", f"m{n}", "placed")
    kept = log.recent(limit=10_000)
    assert 50 <= len(kept) <= 50 + PRUNE_EVERY and kept[-1].subject == "m499"


def test_listeners_and_subscribers_see_each_event(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = EventLog(Store(tmp_path / "db.sqlite3"))
        heard: list[Event] = []
        log.listen(heard.append)
        queue = log.subscribe()
        log.record("coordinator.ready", "gemma:latest", "ready")
        assert [e.kind for e in heard] == ["coordinator.ready"]
        assert (await asyncio.wait_for(queue.get(), 1)).subject == "gemma:latest"
        log.unsubscribe(queue)
        log.record("coordinator.stopped", "gemma:latest", "keep-alive expired")
        assert queue.empty()

    asyncio.run(scenario())
