"""The connect probe that tells a cut link from a frozen agent (the cut itself: faults/test_resume.py)."""

from __future__ import annotations

import asyncio
import socket

from llamafleet.controller.coordinator.reachability import RpcReachability, accepts


def test_a_listening_port_accepts_and_a_closed_one_is_gone() -> None:
    async def run() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        listening = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            closed = f"127.0.0.1:{spare.getsockname()[1]}"  # bound, never listening: refused
        assert await accepts(listening) and not await accepts(closed)
        probes = RpcReachability(timeout_s=1.0, again_s=60.0)
        assert not probes.gone(listening) and not probes.gone(closed)  # the probes start: no verdict yet
        await asyncio.sleep(0.3)
        assert not probes.gone(listening) and probes.gone(closed)
        probes.forget(closed)
        assert not probes.gone(closed)  # afresh after the node came back
        probes.close()
        server.close()
        await server.wait_closed()
    asyncio.run(run())
