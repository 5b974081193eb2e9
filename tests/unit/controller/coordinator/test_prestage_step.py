"""The manager's pre-staging step: holders are asked, a failure is an event and never fails the load."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from llamafleet.common.agent_client import AgentCallError
from llamafleet.controller.coordinator import manager as manager_module
from llamafleet.controller.coordinator.manager import CoordinatorManager
from llamafleet.controller.models import ResolvedModel
from llamafleet.controller.placement.plan import DeviceAssignment, Plan
from llamafleet.proto.v1 import agent_pb2 as pb

SHA = "ab" * 32


class FakeInventory:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, list[tuple[int, int]]]] = []
        self.slots: dict[str, object] = {}

    async def stage_tensors(self, address: str, sha256: str, ranges: list[tuple[int, int]],
                            timeout_s: float, rpc_server_indexes: Sequence[int] = (),
                            known: object = None) -> pb.StageTensorsResponse:
        self.calls.append((address, sha256, ranges))
        self.slots[address] = rpc_server_indexes
        if address == "broken":
            raise AgentCallError("agent at broken: FAILED_PRECONDITION: no C compiler")
        return pb.StageTensorsResponse(staged=1, bytes_written=100, cached_bytes=100, seconds=0.5)


def manager(holders_sha: str | None) -> tuple[CoordinatorManager, FakeInventory, list[tuple[str, str, dict[str, Any]]]]:
    events: list[tuple[str, str, dict[str, Any]]] = []
    planner = SimpleNamespace(digests=SimpleNamespace(digest=lambda path: holders_sha), header=lambda path: None)
    runtime = SimpleNamespace(events=lambda kind, subject, message, **data: events.append((kind, subject, data)))
    inventory = FakeInventory()
    made = CoordinatorManager(cast(Any, planner), cast(Any, inventory), cast(Any, None), cast(Any, runtime), 300.0)
    return made, inventory, events


def plan(holders: list[str]) -> Plan:
    assignments = [DeviceAssignment(n, f"{n}:{50052 + slot}", "CPU", i, 1, 0, 0, 0, 0, 0, rpc_index=slot)
                   for i, (n, slot) in enumerate((("ok", 2), ("broken", 0), ("none", 1)))]
    return Plan("m", cast(Any, None), True, assignments, holders=holders)


@pytest.fixture(autouse=True)
def ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_module, "node_ranges",
                        lambda header, assignments: {"ok": [(0, 100)], "broken": [(100, 100)], "none": [(5, 100)]})


RESOLVED = ResolvedModel("m", Path("/m.gguf"), "models-dir")


def test_a_failing_holder_is_an_event_and_the_others_still_count() -> None:
    made, inventory, events = manager(SHA)
    asyncio.run(made._prestage("m", RESOLVED, plan(["ok", "broken"])))
    assert sorted(c[0] for c in inventory.calls) == ["broken", "ok"]  # "none" holds no file: never asked
    assert ("stage.failed", "broken") in [(k, s) for k, s, _ in events]
    [(kind, subject, data)] = [e for e in events if e[0] == "stage"]
    assert subject == "ok" and data["cached_bytes"] == 100 and data["model"] == "m"
    doc = made._prestaged["m"]
    assert doc["bytes"] == 100 and "no C compiler" in doc["nodes"]["broken"]["error"]


def test_nothing_is_asked_while_the_sha256_is_unknown() -> None:
    made, inventory, events = manager(None)
    asyncio.run(made._prestage("m", RESOLVED, plan(["ok"])))
    assert inventory.calls == [] and events == [] and made._prestaged["m"]["bytes"] == 0


def test_each_holder_is_told_which_of_its_rpc_servers_the_share_is_for() -> None:
    made, inventory, _ = manager(SHA)
    asyncio.run(made._prestage("m", RESOLVED, plan(["ok", "broken"])))
    assert inventory.slots == {"ok": [2], "broken": [0]}


def test_a_per_device_node_names_every_rpc_server_of_its_share() -> None:
    # --rpc-layout per-device: node "ok" serves its two GPUs through rpc-servers #2 and #3 (its
    # slot 1), "broken" its one GPU through #0. Each of them keeps the entries from eviction.
    made, inventory, _ = manager(SHA)
    assignments = [DeviceAssignment(n, f"{n}:{50052 + index}", "CUDA0", i, 1, 0, 0, 0, 0, 0, rpc_index=index)
                   for i, (n, index) in enumerate((("ok", 2), ("ok", 3), ("broken", 0)))]
    asyncio.run(made._prestage("m", RESOLVED, Plan("m", cast(Any, None), True, assignments, holders=["ok", "broken"])))
    assert inventory.slots == {"ok": [2, 3], "broken": [0]}
    assert [c[0] for c in inventory.calls].count("ok") == 1  # one staging of the node's whole share
