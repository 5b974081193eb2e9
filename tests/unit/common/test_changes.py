from __future__ import annotations

import asyncio

from llamafleet.common.changes import ChangeFeed


def test_every_waiter_sees_a_change_and_a_quiet_feed_times_out() -> None:
    async def scenario() -> tuple[list[bool], bool]:
        feed = ChangeFeed()
        seen = feed.version
        waiters = [asyncio.create_task(feed.wait_newer(seen, 5)) for _ in range(3)]
        await asyncio.sleep(0.01)
        feed.bump()
        woken = await asyncio.gather(*waiters)
        quiet = await feed.wait_newer(feed.version, 0.05)
        return woken, quiet

    woken, quiet = asyncio.run(scenario())
    assert woken == [True, True, True] and quiet is False


def test_a_change_before_the_wait_is_not_missed() -> None:
    async def scenario() -> bool:
        feed = ChangeFeed()
        seen = feed.version
        feed.bump()
        return await feed.wait_newer(seen, 0)

    assert asyncio.run(scenario())
