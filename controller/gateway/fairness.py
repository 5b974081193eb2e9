"""Fair turns at a coordinator's slots: many requests from one client cannot starve another.

llama-server queues what exceeds its slots first come, first served, so a client that sends
fifty requests at once holds every slot until all fifty are done. The gateway therefore admits
at most `capacity` requests per model into llama-server and hands each freed slot to the next
*client* in turn (round robin), taking that client's oldest request.

A client is the API key it presented, when it is one of ours (hashed: keys are never kept), else
its address: what the gateway can tell apart without trusting anything the client says about
itself (without API keys a made-up Authorization header per request would be a new client each
time). A client new to the queue takes its turn after those already waiting, not before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import AsyncIterator

from aiohttp import web

MAX_REMEMBERED_CLIENTS = 4096
# Where the guard (controller/web.py) leaves a request's Authorization once it is one of our keys.
VALID_KEY = web.RequestKey("llamafleet.valid_key", str)


def client_of(request: web.Request) -> str:
    authorization = request.get(VALID_KEY, "")
    if authorization:
        return "key:" + hashlib.sha256(authorization.encode()).hexdigest()[:16]
    return f"addr:{request.remote or '?'}"


class FairQueue:
    def __init__(self, capacity: int = 1) -> None:
        self.capacity = max(capacity, 1)
        self.active = 0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        # When each client last got a turn: the next turn goes to the waiting client served
        # longest ago (never served first), which is a round robin over clients.
        self._turns = 0
        self._last_turn: dict[str, float] = {}

    @property
    def depth(self) -> int:
        """Requests waiting for a turn."""
        return sum(len(q) for q in self._waiting.values())

    def resize(self, capacity: int) -> None:
        """A reloaded coordinator may have another slot count; the queue follows it."""
        self.capacity = max(capacity, 1)
        self._grant()

    @contextlib.asynccontextmanager
    async def turn(self, client: str) -> AsyncIterator[None]:
        """Hold one of the slots for the body of the `async with`."""
        if self.active < self.capacity and not self._waiting:
            self.active += 1
            self._note_turn(client)
        else:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # Never served: as if served just before the last one was, so a new client goes ahead
            # of the one served just now but behind everyone who has waited longer (a stream of
            # new names cannot jump the round).
            self._last_turn.setdefault(client, self._turns - 0.5)
            self._waiting.setdefault(client, deque()).append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    # The turn came just as the client left: pass it on, not lose it.
                    self.active -= 1
                    self._grant()
                else:
                    self._forget(client, granted)
                raise
        try:
            yield
        finally:
            self.active -= 1
            self._grant()

    def _forget(self, client: str, granted: asyncio.Future[None]) -> None:
        queue = self._waiting.get(client)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(granted)
            if not queue:
                del self._waiting[client]

    def _note_turn(self, client: str) -> None:
        self._turns += 1
        self._last_turn[client] = self._turns
        if len(self._last_turn) > MAX_REMEMBERED_CLIENTS:
            # Only the order among waiting clients matters; forget the rest.
            self._last_turn = {c: t for c, t in self._last_turn.items() if c in self._waiting or c == client}

    def _grant(self) -> None:
        while self.active < self.capacity and self._waiting:
            client = min(self._waiting, key=lambda c: self._last_turn.get(c, 0))
            queue = self._waiting[client]
            granted = queue.popleft()
            if not queue:
                del self._waiting[client]
            if granted.done():
                continue  # its request was cancelled meanwhile
            self.active += 1
            self._note_turn(client)
            granted.set_result(None)
