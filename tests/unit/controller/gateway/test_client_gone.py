"""A request whose client hung up leaves every queue (controller/web.py's cancel_when_client_gone):
real sockets to a real aiohttp server, clients that connect, ask and close. The same with a real
coordinator behind it is tests/integration/controller/test_orphans.py."""

from __future__ import annotations

import asyncio
import json
import socket

from aiohttp import web

from llamafleet.controller.gateway.fairness import FairQueue
from llamafleet.controller.web import cancel_when_client_gone, errors_as_json


def _ask(port: int, path: str) -> socket.socket:
    """A client that sends its request and waits (its caller closes it: the hang-up)."""
    conn = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": "m", "prompt": "hi"}).encode()
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return conn


def test_clients_that_hang_up_while_queued_leave_the_queue_and_never_get_a_turn() -> None:
    queue = FairQueue(capacity=1)
    served: list[str] = []
    release = asyncio.Event()

    async def generate(request: web.Request) -> web.Response:
        async with queue.turn("one client"):
            served.append(request.path)
            await release.wait()
        return web.json_response({"done": True})

    async def run() -> None:
        app = web.Application(middlewares=[errors_as_json, cancel_when_client_gone])
        app.router.add_post("/api/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        try:
            busy = await loop.run_in_executor(None, _ask, port, "/api/generate")
            while not served:
                await asyncio.sleep(0.01)
            waiting = [await loop.run_in_executor(None, _ask, port, "/api/generate") for _ in range(3)]
            for _ in range(200):
                if queue.depth == 3:
                    break
                await asyncio.sleep(0.01)
            assert queue.depth == 3
            for conn in waiting:
                conn.close()
            for _ in range(300):
                if queue.depth == 0:
                    break
                await asyncio.sleep(0.01)
            assert queue.depth == 0, "requests whose clients hung up are still queued"
            release.set()
            reply = await loop.run_in_executor(None, busy.recv, 4096)
            assert b"200 OK" in reply
            busy.close()
            await asyncio.sleep(0.3)
            assert served == ["/api/generate"], "a turn went to a client that had gone"
            assert queue.active == 0
        finally:
            await runner.cleanup()

    asyncio.run(run())
