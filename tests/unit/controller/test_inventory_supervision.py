"""A node watcher or the transition monitor that raises is run again, and says why (was: dead for good)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llamafleet.common.agent_client import AgentAddress
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.store import Store

NOWHERE = "127.0.0.1:9"  # nothing listens: the watcher dials and fails, as for any down agent


def test_a_watcher_that_raises_is_restarted_and_the_node_shows_the_cause(tmp_path: Path) -> None:
    dials = 0
    events: list[tuple[str, str]] = []

    def target(address: str) -> AgentAddress:
        nonlocal dials
        dials += 1
        if dials == 1:
            raise RuntimeError("credential table is corrupt")
        return AgentAddress(address, "")  # no credential: the watcher waits, as it should

    async def scenario() -> dict[str, Any]:
        inventory = Inventory(Store(tmp_path / "db.sqlite3"), target, 0.2, 0.6,
                              events=lambda kind, subject, message, **data: events.append((kind, message)))
        await inventory.start((NOWHERE,))
        await asyncio.sleep(1.5)
        doc = inventory.describe()[0]
        await inventory.close()
        return doc

    doc = asyncio.run(scenario())
    assert dials >= 2  # watched again after the back-off
    assert doc["watch_failure"]["cause"] == "RuntimeError: credential table is corrupt"
    assert ("task.failed", f"watcher of {NOWHERE} failed: RuntimeError: credential table is corrupt") in events


def test_a_transition_monitor_whose_event_sink_raises_keeps_reporting(tmp_path: Path) -> None:
    calls: list[str] = []

    def flaky_sink(kind: str, subject: str, message: str, **data: Any) -> None:
        calls.append(kind)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")

    async def scenario() -> None:
        inventory = Inventory(Store(tmp_path / "db.sqlite3"), lambda a: AgentAddress(a, ""), 0.1, 0.3,
                              events=flaky_sink)
        await inventory.start((NOWHERE,))
        await asyncio.sleep(0.3)
        inventory.set_maintenance(NOWHERE, True)  # the monitor's first event: the sink raises
        await asyncio.sleep(1.0)
        inventory.set_maintenance(NOWHERE, False)
        await asyncio.sleep(1.0)
        await inventory.close()

    asyncio.run(scenario())
    assert calls[0] == "node.maintenance"
    assert "node.unreachable" in calls[1:]  # the monitor still reports after its failure
