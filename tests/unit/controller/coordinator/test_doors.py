"""The gateway's doors to coordinators on workers: a key for exactly one URL, and cut when it goes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from llamafleet.controller.coordinator.command import CoordinatorSpec, LocalShare
from llamafleet.controller.coordinator.process import CoordinatorExited
from llamafleet.controller.coordinator.remote import CoordinatorDoors, RemoteCoordinator
from llamafleet.proto.v1 import agent_pb2 as pb


@contextlib.asynccontextmanager
async def server() -> AsyncIterator[str]:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Authorization", "-"))

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(3600)  # a worker that went silent (a cut link)
        return response

    async def silent(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)  # never even answers the headers
        return web.Response()

    app = web.Application()
    app.router.add_get("/c/{id}/echo", echo)
    app.router.add_get("/other/echo", echo)
    app.router.add_get("/c/{id}/trickle", trickle)
    app.router.add_get("/c/{id}/silent", silent)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _keys_and_cuts() -> None:
    doors = CoordinatorDoors()
    async with server() as base, aiohttp.ClientSession(middlewares=(doors.middleware,)) as session:
        doors.expect("a" * 32)
        assert doors.known("a" * 32)
        doors.open("a" * 32, f"{base}/c/{'a' * 32}", "KEY-A")
        doors.open("b" * 32, f"{base}/c/{'b' * 32}", "KEY-B")
        async with session.get(f"{base}/c/{'a' * 32}/echo") as reply:
            assert await reply.text() == "Bearer KEY-A"
        async with session.get(f"{base}/c/{'b' * 32}/echo") as reply:
            assert await reply.text() == "Bearer KEY-B"
        for elsewhere in (f"{base}/other/echo", f"{base}/c/{'c' * 32}/echo"):
            async with session.get(elsewhere) as reply:
                assert await reply.text() == "-", "a key went to a URL it is not for"

        # A stream open to a coordinator that goes away is cut at once, not held.
        async with session.get(f"{base}/c/{'a' * 32}/trickle") as reply:
            assert (await reply.content.readline()).startswith(b"data: first")
            asyncio.get_running_loop().call_later(0.2, doors.close, "a" * 32)
            with pytest.raises((aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
                async with asyncio.timeout(5):
                    while await reply.content.readline():
                        pass
                    raise aiohttp.ClientConnectionError("ended")  # an end without an error reads the same
        assert not doors.known("a" * 32)

        # So is a request still waiting for its answer's headers.
        asyncio.get_running_loop().call_later(0.2, doors.close, "b" * 32)
        with pytest.raises(aiohttp.ClientConnectionError, match="coordinator is gone"):
            async with asyncio.timeout(5):
                await session.get(f"{base}/c/{'b' * 32}/silent")


def test_a_key_goes_to_its_coordinator_only_and_a_gone_coordinator_cuts_its_requests() -> None:
    asyncio.run(_keys_and_cuts())


class _AgentWithPlainProxy:
    """An agent (say one from before the proxy had TLS) that reports an http:// proxy."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    def node_secret(self, node: str) -> str:
        return "secret-of-the-node"

    async def start_coordinator(self, node: str, request: pb.StartCoordinatorRequest) -> pb.CoordinatorStatus:
        return pb.CoordinatorStatus(id=request.id, model=request.model, url=f"http://10.0.0.5:40001/c/{request.id}")

    async def stop_coordinator(self, node: str, coordinator_id: str, timeout_s: float) -> None:
        self.stopped.append(coordinator_id)


def test_with_agent_tls_no_key_goes_to_a_plain_http_proxy() -> None:
    spec = CoordinatorSpec("gemma", Path("/m/gemma.gguf"), (), (), 18, 2048, 1,
                           local=LocalShare("10.0.0.5:50051", (), (19,), "a" * 64))
    inventory = _AgentWithPlainProxy()
    doors = CoordinatorDoors(tls_only=True)
    with pytest.raises(CoordinatorExited, match="plain HTTP .* its key is not sent there"):
        asyncio.run(RemoteCoordinator.start(inventory, doors, spec))  # type: ignore[arg-type]
    [stopped] = inventory.stopped
    assert not doors.known(stopped)
