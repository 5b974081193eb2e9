"""Real gRPC servers that are not agents: one that lies in its status, one that records what it is sent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc


class LyingAgent(pb_grpc.AgentServiceServicer):
    """Answers GetStatus and WatchStatus with whatever status it was given, heartbeat after heartbeat."""

    def __init__(self, status: pb.AgentStatus) -> None:
        self.status = status

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(status=self.status)

    async def WatchStatus(self, request: pb.WatchStatusRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.WatchStatusResponse]:
        interval = (request.heartbeat_interval_ms or 300) / 1000
        while True:
            yield pb.WatchStatusResponse(status=self.status, reason=pb.WATCH_REASON_HEARTBEAT)
            await asyncio.sleep(interval)


class Recorder(grpc.GenericRpcHandler):
    """Records the method and metadata of every call it receives, then leaves it unimplemented."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[tuple[str, Any], ...]]] = []

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self.calls.append((handler_call_details.method, tuple(handler_call_details.invocation_metadata or ())))
        return None


_loop: asyncio.AbstractEventLoop | None = None


def _shared_loop() -> asyncio.AbstractEventLoop:
    """One event loop thread for every fake server of the process: grpc.aio binds to one loop."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="fake gRPC servers", daemon=True).start()
    return _loop


@contextmanager
def grpc_server(host: str, setup: Callable[[grpc.aio.Server], None]) -> Iterator[str]:
    """A grpc.aio server on HOST and a free port, on the fakes' own event loop; yields HOST:PORT."""
    address = f"{host}:{free_loopback_port()}"
    loop = _shared_loop()

    async def start() -> grpc.aio.Server:
        server = grpc.aio.server()
        setup(server)
        server.add_insecure_port(address)
        await server.start()
        return server

    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield address
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)


@contextmanager
def lying_agent(host: str, status: pb.AgentStatus) -> Iterator[str]:
    with grpc_server(host, lambda s: pb_grpc.add_AgentServiceServicer_to_server(LyingAgent(status), s)) as address:
        yield address


@contextmanager
def recording_listener(host: str) -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    with grpc_server(host, lambda s: s.add_generic_rpc_handlers((recorder,))) as address:
        yield address, recorder
