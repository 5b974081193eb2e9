"""A change counter that any number of waiters can watch without stepping on each other."""

from __future__ import annotations

import asyncio


class ChangeFeed:
    """A version that increases on every change, and a way to wait for a newer one.

    Each change replaces the event it sets, so no waiter ever clears what another waits on.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait_newer(self, version: int, timeout_s: float) -> bool:
        """True when a change newer than `version` happened within `timeout_s`."""
        if self.version > version:
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout=max(timeout_s, 0))
        except TimeoutError:
            return self.version > version
        return True
