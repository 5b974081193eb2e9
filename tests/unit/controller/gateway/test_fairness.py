"""Fair turns at the slots: a client with many requests cannot starve one with few."""

from __future__ import annotations

import asyncio

import pytest

from llamafleet.controller.gateway.fairness import FairQueue


async def _served_order(queue: FairQueue, arrivals: list[str], hold_s: float = 0.01) -> list[str]:
    served: list[str] = []

    async def one(client: str) -> None:
        async with queue.turn(client):
            served.append(client)
            await asyncio.sleep(hold_s)

    tasks = []
    for client in arrivals:
        tasks.append(asyncio.create_task(one(client)))
        await asyncio.sleep(0)  # arrive in this order
    await asyncio.gather(*tasks)
    return served


def test_one_slot_alternates_between_clients_instead_of_first_come_first_served() -> None:
    order = asyncio.run(_served_order(FairQueue(1), ["a"] * 6 + ["b"]))
    # a's first request had the slot; b was next in the round, not seventh.
    assert order.index("b") == 1 and order.count("a") == 6


def test_capacity_is_never_exceeded_and_everyone_is_served() -> None:
    async def run() -> int:
        queue = FairQueue(3)
        peak = 0

        async def one(client: str) -> None:
            nonlocal peak
            async with queue.turn(client):
                peak = max(peak, queue.active)
                await asyncio.sleep(0.005)

        await asyncio.gather(*(one(f"c{i % 4}") for i in range(40)))
        assert queue.active == 0 and queue.depth == 0
        return peak

    assert asyncio.run(run()) == 3


@pytest.mark.parametrize("leaves", ["while waiting", "with the turn in hand"])
def test_a_waiter_that_gives_up_leaves_no_hole_and_no_lost_turn(leaves: str) -> None:
    async def run() -> list[str]:
        queue = FairQueue(1)
        served: list[str] = []
        release = asyncio.Event()

        async def holder() -> None:
            async with queue.turn("a"):
                await release.wait()

        async def waiter(client: str) -> None:
            async with queue.turn(client):
                served.append(client)

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        quitter = asyncio.create_task(waiter("b"))
        patient = asyncio.create_task(waiter("c"))
        await asyncio.sleep(0)
        assert queue.depth == 2
        if leaves == "with the turn in hand":
            release.set()
            await asyncio.sleep(0)  # the holder ends: b's turn is granted, b has not run yet
            assert queue.active == 1 and queue.depth == 1
        quitter.cancel()
        release.set()
        # A lost turn would leave c waiting for ever: fail instead of hanging.
        await asyncio.wait_for(asyncio.gather(first, patient), timeout=5)
        assert queue.active == 0 and queue.depth == 0
        return served

    assert asyncio.run(run()) == ["c"]


def test_resizing_to_more_slots_admits_waiters_at_once() -> None:
    async def run() -> int:
        queue = FairQueue(1)
        gate = asyncio.Event()

        async def one() -> None:
            async with queue.turn("a"):
                await gate.wait()

        tasks = [asyncio.create_task(one()) for _ in range(4)]
        await asyncio.sleep(0)
        queue.resize(4)
        await asyncio.sleep(0)
        active = queue.active
        gate.set()
        await asyncio.gather(*tasks)
        return active

    assert asyncio.run(run()) == 4


def test_a_new_client_waits_behind_those_who_waited_longer() -> None:
    async def run() -> list[str]:
        queue = FairQueue(1)
        served: list[str] = []
        gates = {name: asyncio.Event() for name in ("a", "b", "a2", "c")}

        async def one(client: str, name: str) -> None:
            async with queue.turn(client):
                served.append(name)
                await gates[name].wait()

        tasks = [asyncio.create_task(one("a", "a"))]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(one("b", "b")), asyncio.create_task(one("a", "a2"))]
        await asyncio.sleep(0)
        gates["a"].set()
        await asyncio.sleep(0.01)  # b has the slot now; a's second request waits
        tasks.append(asyncio.create_task(one("c", "c")))  # a new name arrives
        await asyncio.sleep(0)
        for name in ("b", "a2", "c"):
            gates[name].set()
        await asyncio.gather(*tasks)
        return served

    # a waited since before b was served; the newcomer c does not jump ahead of it.
    assert asyncio.run(run()) == ["a", "b", "a2", "c"]
