"""The agent's gRPC edge: thin servicers, bearer-token auth, and one map of errors to status codes."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from llamafleet.agent.convert import (
    build_event_to_proto,
    coordinator_from_proto,
    coordinator_to_proto,
    build_to_proto,
    model_file_to_proto,
    rpc_server_to_proto,
    status_to_proto,
)
from llamafleet.agent.coordinators import CoordinatorRefused, Coordinators, TooManyCoordinators, UnknownCoordinator
from llamafleet.agent.core import Agent, BuildBusyError
from llamafleet.agent.credential import Keyring
from llamafleet.common.digests import HashCancelled
from llamafleet.common.fnv import FnvUnavailable
from llamafleet.agent.pull import (
    DigestMismatch,
    NameTaken,
    NotEnoughSpace,
    Offer,
    PushBusy,
    PushInterrupted,
    PushRefused,
    PushStopped,
    Received,
)
from llamafleet.agent.staging import ByteRange, StagingRefused
from llamafleet.agent.settings import AgentSettings
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.llamacpp.build import BuildError, BuildEvent, BuildOptions
from llamafleet.common.llamacpp.install import InstallError
from llamafleet.common.llamacpp.source import SourceError
from llamafleet.common.node_auth import ProofChecker, ProofError, Verified
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AgentService"].full_name
# How long a start/stop/restart RPC waits for the state to settle before answering.
SETTLE_TIMEOUT_S = 30.0
_PUBLIC_PREFIX = "/grpc.health.v1.Health/"

# Domain errors → gRPC codes, in one place. Order matters: subclasses first.
_ERROR_CODES: list[tuple[type[LlamafleetError], grpc.StatusCode]] = [
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (SourceError, grpc.StatusCode.INVALID_ARGUMENT),
    (BuildBusyError, grpc.StatusCode.ABORTED),
    (PushBusy, grpc.StatusCode.ABORTED),
    (PushInterrupted, grpc.StatusCode.ABORTED),
    (PushStopped, grpc.StatusCode.UNAVAILABLE),
    (NotEnoughSpace, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NameTaken, grpc.StatusCode.ALREADY_EXISTS),
    (DigestMismatch, grpc.StatusCode.DATA_LOSS),
    (PushRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (TooManyCoordinators, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (CoordinatorRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownCoordinator, grpc.StatusCode.NOT_FOUND),
    (StagingRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (FnvUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (BuildError, grpc.StatusCode.FAILED_PRECONDITION),
    (InstallError, grpc.StatusCode.FAILED_PRECONDITION),
    (LlamafleetError, grpc.StatusCode.FAILED_PRECONDITION),
]


def status_code_for(exc: LlamafleetError) -> grpc.StatusCode:
    return next(code for kind, code in _ERROR_CODES if isinstance(exc, kind))


def _details(exc: LlamafleetError) -> str:
    return exc.message + (f"\n{exc.detail}" if exc.detail else "")


F = TypeVar("F", bound=Callable[..., Any])


def maps_errors(method: F) -> F:
    """Turn a LlamafleetError raised by a unary handler into the matching status code."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except LlamafleetError as exc:
            # The operator-facing message travels as the status details.
            await context.abort(status_code_for(exc), _details(exc))

    return wrapper  # type: ignore[return-value]


class AgentServicer(pb_grpc.AgentServiceServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @maps_errors
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        return pb.GetStatusResponse(status=status_to_proto(self.agent.snapshot()))

    async def WatchStatus(
        self, request: pb.WatchStatusRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchStatusResponse]:
        interval = (request.heartbeat_interval_ms / 1000) or self.agent.settings.heartbeat_interval_s
        changes = self.agent.changes
        seen = changes.version
        yield pb.WatchStatusResponse(status=status_to_proto(self.agent.snapshot()), reason=pb.WATCH_REASON_INITIAL)
        while True:
            changed = await changes.wait_newer(seen, interval)
            seen = changes.version
            reason = pb.WATCH_REASON_CHANGE if changed else pb.WATCH_REASON_HEARTBEAT
            yield pb.WatchStatusResponse(status=status_to_proto(self.agent.snapshot()), reason=reason)

    async def _act(self, action: str, index: int) -> pb.RpcServerStatus:
        supervisor = self.agent.supervisor_at(index)
        ticket = supervisor.request(action)
        return rpc_server_to_proto(await supervisor.wait_settled(ticket, SETTLE_TIMEOUT_S))

    @maps_errors
    async def StartRpcServer(self, request: pb.StartRpcServerRequest, context: grpc.aio.ServicerContext) -> pb.StartRpcServerResponse:
        return pb.StartRpcServerResponse(rpc_server=await self._act("start", request.index))

    @maps_errors
    async def StopRpcServer(self, request: pb.StopRpcServerRequest, context: grpc.aio.ServicerContext) -> pb.StopRpcServerResponse:
        return pb.StopRpcServerResponse(rpc_server=await self._act("stop", request.index))

    @maps_errors
    async def RestartRpcServer(self, request: pb.RestartRpcServerRequest, context: grpc.aio.ServicerContext) -> pb.RestartRpcServerResponse:
        return pb.RestartRpcServerResponse(rpc_server=await self._act("restart", request.index))

    def _coordinators(self) -> Coordinators:
        if self.agent.coordinators is None:
            raise CoordinatorRefused("this agent runs no coordinators (--max-coordinators 0)")
        return self.agent.coordinators

    @maps_errors
    async def StartCoordinator(self, request: pb.StartCoordinatorRequest,
                               context: grpc.aio.ServicerContext) -> pb.StartCoordinatorResponse:
        started = await self._coordinators().start(coordinator_from_proto(request))
        return pb.StartCoordinatorResponse(coordinator=coordinator_to_proto(started))

    @maps_errors
    async def StopCoordinator(self, request: pb.StopCoordinatorRequest,
                              context: grpc.aio.ServicerContext) -> pb.StopCoordinatorResponse:
        stopped = await self._coordinators().stop(request.id)
        return pb.StopCoordinatorResponse(coordinator=coordinator_to_proto(stopped))

    @maps_errors
    async def StageTensors(self, request: pb.StageTensorsRequest, context: grpc.aio.ServicerContext) -> pb.StageTensorsResponse:
        ranges = [ByteRange(r.offset, r.size, r.fnv1a if r.HasField("fnv1a") else None) for r in request.ranges]
        try:
            # The union: a controller sets both (rpc_server_index for agents older than the list).
            indexes = [*request.rpc_server_indexes]
            if request.HasField("rpc_server_index"):
                indexes.append(request.rpc_server_index)
            result = await self.agent.stage_tensors(request.sha256, ranges, indexes)
        except OSError as exc:
            # The disk is full, the file went away mid-read: the controller loads over the network.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"staging failed: {exc.strerror or exc}")
        except HashCancelled:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the agent is stopping")
        return pb.StageTensorsResponse(
            staged=result.staged, present=result.present, skipped_small=result.skipped_small,
            rewritten=result.rewritten, bytes_written=result.bytes_written, cached_bytes=result.cached_bytes,
            seconds=result.seconds, entries=list(result.entries), referenced=result.referenced)

    @maps_errors
    async def PrepareModelPush(self, request: pb.PrepareModelPushRequest,
                               context: grpc.aio.ServicerContext) -> pb.PrepareModelPushResponse:
        prepared = await self.agent.prepare_push(Offer(request.name, request.sha256, request.size_bytes))
        reply = pb.PrepareModelPushResponse(have_bytes=prepared.have_bytes, already_held=prepared.held is not None,
                                            free_bytes=prepared.free_bytes)
        if prepared.held is not None:
            reply.model.CopyFrom(model_file_to_proto(prepared.held))
        return reply

    async def PushModel(self, requests: AsyncIterator[pb.PushModelRequest],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PushModelResponse]:
        try:
            first = await anext(aiter(requests), None)
            if first is None or first.WhichOneof("part") != "header":
                raise UsageError("the first PushModel message must be the header")
            header = first.header
            push = await self.agent.begin_push(Offer(header.name, header.sha256, header.size_bytes), header.offset)
            if isinstance(push, Received):
                received = push
            else:
                try:
                    yield pb.PushModelResponse(accepted=pb.PushModelAccepted(offset=push.offset))
                    received = await push.receive(_data(requests))
                finally:
                    await push.end()  # the caller went away after `accepted`: the file's turn is free again
        except LlamafleetError as exc:
            # Same mapping as the unary calls; the caller reads it before it sends a byte, or at the end.
            await context.abort(status_code_for(exc), _details(exc))
        yield pb.PushModelResponse(done=pb.PushModelDone(
            model=model_file_to_proto(received.model), received_bytes=received.received_bytes,
            already_held=received.already_held, seconds=received.seconds))

    async def Build(self, request: pb.BuildRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.BuildResponse]:
        cuda = {pb.CUDA_MODE_ON: True, pb.CUDA_MODE_OFF: False}.get(request.cuda)
        options = BuildOptions(source=request.source, state_dir=self.agent.settings.state_path,
                               cuda=cuda, jobs=request.jobs, patches=() if request.no_patches else None)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[BuildEvent | None] = asyncio.Queue()

        def progress(event: BuildEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        build = asyncio.ensure_future(self.agent.run_build(options, progress))
        build.add_done_callback(lambda _: events.put_nowait(None))
        while (event := await events.get()) is not None:
            yield build_event_to_proto(event)
        try:
            outcome = build.result()
        except LlamafleetError as exc:
            # Same mapping as the unary calls; a stream aborts after the progress it sent.
            await context.abort(status_code_for(exc), _details(exc))
        yield pb.BuildResponse(result=pb.BuildResult(build=build_to_proto(outcome.manifest), cached=outcome.cached))


async def _data(requests: AsyncIterator[pb.PushModelRequest]) -> AsyncIterator[bytes]:
    async for message in requests:
        if message.WhichOneof("part") != "data":
            raise UsageError("only the first PushModel message may be a header")
        yield message.data


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every method but health needs the node credential; checked before the handler runs.

    Accepted: an HMAC proof of it (`common/node_auth.py`, what the controller sends; it may carry
    a rotation or revocation), or `Bearer <secret>` (the local CLI, and controllers that still
    use the deprecated shared token). Nothing is accepted while the agent holds no credential.
    """

    def __init__(self, keyring: Keyring) -> None:
        self._keyring = keyring
        self._proofs = ProofChecker()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if details.method.startswith(_PUBLIC_PREFIX) or handler is None:
            return handler
        metadata = dict(details.invocation_metadata or ())
        presented = str(metadata.get("authorization", ""))
        held = self._keyring.held()
        if not held:
            log.warning("refused %s: this agent holds no credential (%s)", details.method,
                        self._keyring.source or "not joined yet")
            return _refusal(handler, "this agent holds no credential yet (not joined, or revoked)")
        if presented.startswith("Bearer "):
            # Every held secret is compared, in constant time, so timing says nothing about which.
            if any([hmac.compare_digest(f"Bearer {s}".encode(), presented.encode()) for s in held]):
                return handler
            why = "wrong bearer token"
        elif presented:
            try:
                verified = self._proofs.verify(presented, details.method, held)
            except ProofError as exc:
                why = str(exc)
            else:
                return self._act(verified, handler)
        else:
            why = "missing credential"
        # Never log what was presented: a near-miss token is still a secret.
        log.warning("refused %s: %s", details.method, why)
        return _refusal(handler, "missing bearer token" if not presented else f"missing or wrong credential: {why}")

    def _act(self, verified: Verified, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        try:
            self._keyring.used(verified.secret)
            if verified.action == "rotate":
                self._keyring.stage(verified.new_secret)
                log.info("the controller staged a new node credential")
            elif verified.action == "revoke":
                self._keyring.revoke(verified.secret)
        except OSError as exc:
            # The change must be on disk before the controller is told it happened.
            log.error("cannot store the credential change: %s", exc)
            return _refusal(handler, f"cannot store the credential change: {exc.strerror}",
                            grpc.StatusCode.FAILED_PRECONDITION)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str,
             code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; this makes the function a generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream:
        # A two-way stream (PushModel) is refused before a single message of it is read.
        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


async def start_server(agent: Agent, settings: AgentSettings, keyring: Keyring) -> tuple[grpc.aio.Server, int]:
    """Bind the gRPC server (TLS when configured); returns it and the bound port."""
    server = grpc.aio.server(interceptors=[TokenAuthInterceptor(keyring)])
    pb_grpc.add_AgentServiceServicer_to_server(AgentServicer(agent), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if settings.tls_cert and settings.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(_read(settings.tls_key), _read(settings.tls_cert))],
            root_certificates=_read(settings.tls_client_ca) if settings.tls_client_ca else None,
            require_client_auth=settings.tls_client_ca is not None,
        )
        port = server.add_secure_port(settings.listen, credentials)
    else:
        port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise UsageError(f"cannot listen on {settings.listen} (address in use or not on this host)")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, port
