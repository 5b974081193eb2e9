"""One generation, end to end: to a pool node (proxied as is) or to a coordinator (leased, streamed).

A coordinator request holds a lease, so the model is not unloaded under it, and hands it back
with the request's keep-alive. When the coordinator cannot be reached before anything was sent
to the client (its rpc-server died and took llama-server with it, say), the deployment is told,
and the request is tried once more on the restarted coordinator: the client sees a slower
answer, not an error. When it breaks after the answer began, a resumable generation (see
gateway/resume.py) waits for the deployment to heal and goes on where it stopped, within
`ResumePolicy`'s bounds; anything else ends with the stream's error line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import aiohttp
from aiohttp import web
from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.coordinator.deployment import Deployment, Lease
from llamafleet.controller.coordinator.manager import CoordinatorManager, canonical
from llamafleet.controller.gateway.pool import OllamaPool, PoolUnavailable
from llamafleet.controller.gateway.router import Route, Router
from llamafleet.controller.gateway.resume import Progress, ResumeFailed
from llamafleet.controller.gateway.upstream import (
    UPSTREAM_TIMEOUT,
    Final,
    Piece,
    UpstreamUnavailable,
)
from llamafleet.controller.metrics import ControllerMetrics
from llamafleet.controller.web import late_error

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class RunInfo:
    """What a response reports about how it was served."""

    started: float = field(default_factory=time.monotonic)
    load_duration_s: float = 0.0
    client: str = ""  # who asked, for fair turns at the slots (see gateway/fairness.py)
    client_gone: Callable[[], bool] = lambda: False  # the client hung up (checked while a stream pauses)
    resumed: int = 0  # how often the answer went on after its coordinator broke

    @property
    def total_ns(self) -> int:
        return int((time.monotonic() - self.started) * 1e9)


def run_info(request: web.Request, client: str) -> RunInfo:
    def gone() -> bool:
        return request.transport is None or request.transport.is_closing()
    return RunInfo(client=client, client_gone=gone)


@dataclass(frozen=True)
class ResumePolicy:
    """How a broken answer goes on (the controller's --resume-timeout, --resume-attempts, --no-resume)."""

    enabled: bool = True
    timeout_s: float = 120.0  # the longest pause: the deployment must be ready again within it
    attempts: int = 2  # resumes per answer


@dataclass
class Resume(Generic[T]):
    """A generation that can go on elsewhere: its progress, and how to open the continuation."""

    progress: Progress
    open: Callable[[str], AsyncGenerator[T]]


CLIENT_GONE = "the client hung up while its answer was paused"


class ClientGone(LlamafleetError):
    """The client hung up while its answer was paused."""


class Dispatcher:
    def __init__(self, manager: CoordinatorManager, router: Router, pool: OllamaPool,
                 session: aiohttp.ClientSession, metrics: ControllerMetrics | None = None,
                 resume_policy: ResumePolicy = ResumePolicy()) -> None:
        self.resume_policy = resume_policy
        self.manager = manager
        self.router = router
        self.pool = pool
        self.session = session
        self.metrics = metrics

    async def observed(self, model: str, pieces: AsyncGenerator[Piece], info: RunInfo) -> AsyncGenerator[Piece]:
        """`pieces`, with the time to the first one and the final counts recorded in the metrics."""
        first: float | None = None
        model = canonical(model)  # one series per model, however clients spell it
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                if first is None:
                    first = time.monotonic() - info.started
                if isinstance(piece, Final) and self.metrics is not None:
                    self.metrics.observe_generation(model, first, piece.predicted_tokens, piece.predicted_ms / 1000,
                                                    info.load_duration_s)
                yield piece

    def route(self, model: str, ctx: int | None = None) -> Route:
        return self.router.route(model, ctx)

    async def fleet_stream(self, model: str, ctx: int | None, keep_alive_s: float | None,
                           open_stream: Callable[[str], AsyncGenerator[T]], info: RunInfo,
                           resume: Resume[T] | None = None) -> AsyncGenerator[T]:
        """Yield what `open_stream(coordinator_url)` yields, with a lease held and one retry; with
        `resume`, a stream that breaks after it began goes on from where it stopped."""
        deployment = self.manager.deployment(model)
        ctx = ctx or self.manager.planner.default_ctx
        policy = self.resume_policy
        broken = 0  # the incarnation a try found dead: the next one waits for a newer one
        retried = False
        resumes = 0
        paused: tuple[float, str] | None = None  # since when, and why, while an answer waits to go on
        while True:
            if paused is None:
                lease = await deployment.acquire(ctx, after_incarnation=broken)
            else:
                lease = await self._recovered(deployment, ctx, broken, info, paused)
            produced = False
            try:
                # More requests than slots wait here, in fair turns, rather than in llama-server's
                # first-come queue; the coordinator may have been replaced while this one waited.
                async with self.manager.queue(deployment).turn(info.client):
                    lease = await deployment.refresh(lease, ctx)
                    info.load_duration_s += lease.load_duration_s
                    stream = open_stream(lease.url)
                    if paused is not None:
                        self._resumed(model, paused, time.monotonic() - paused[0])
                        info.resumed += 1
                        paused = None
                    async for item in stream:
                        produced = True
                        yield item
                return
            except (UpstreamUnavailable, ResumeFailed) as exc:
                progress = resume.progress if resume is not None else None
                if (isinstance(exc, UpstreamUnavailable) and resume is not None and progress is not None
                        and progress.plain and resumes < policy.attempts):
                    # Also when nothing was sent yet: the continuation then starts at the beginning.
                    log.warning("%s: %s after %d tokens; going on when the model is ready again", model,
                                exc.message, progress.safe_ids)
                    resumes += 1
                    paused = (time.monotonic(), exc.message)
                    open_stream = resume.open
                elif isinstance(exc, UpstreamUnavailable) and resume is None and not produced and not retried:
                    log.warning("%s: %s; retrying once after the coordinator recovers", model, exc.message)
                    retried = True
                else:
                    if progress is not None and progress.sent:
                        self._resume_failed(model, exc.message, progress)
                    raise
                deployment.report_broken(lease.incarnation)
                broken = lease.incarnation
            finally:
                deployment.release(keep_alive_s)

    async def _recovered(self, deployment: Deployment, ctx: int, broken: int, info: RunInfo,
                         paused: tuple[float, str]) -> Lease:
        """A lease on the coordinator that replaced incarnation `broken`, within the resume timeout;
        given up as soon as the client hangs up."""
        deadline = paused[0] + self.resume_policy.timeout_s
        acquiring = asyncio.ensure_future(deployment.acquire(ctx, after_incarnation=broken))
        try:
            while True:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait({acquiring}, timeout=max(0.0, min(0.5, left)))
                if done:
                    return acquiring.result()
                if info.client_gone():
                    raise ClientGone(CLIENT_GONE)
                if left <= 0:
                    raise UpstreamUnavailable(f"{paused[1]}; the model was not ready again within "
                                              f"{self.resume_policy.timeout_s:g} s")
        except BaseException as exc:
            if not acquiring.done():
                acquiring.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                # Won the race with the cancel: hand the hold back (the caller never saw it).
                await acquiring
                deployment.release()
            if isinstance(exc, LlamafleetError):  # given up, timed out, or the model fits nowhere now
                self._resume_failed(deployment.model, exc.message, None)
            elif isinstance(exc, asyncio.CancelledError) and info.client_gone():
                # The gateway cancels a generation whose client left (web.cancel_when_client_gone),
                # usually before the poll above sees it: the same end, said the same way.
                self._resume_failed(deployment.model, CLIENT_GONE, None)
            raise

    def _resumed(self, model: str, paused: tuple[float, str], pause_s: float) -> None:
        self.manager.runtime.events("stream.resumed", model, f"a broken answer went on after {pause_s:.1f} s: "
                                    f"{paused[1]}", pause_s=round(pause_s, 3), cause=paused[1])

    def _resume_failed(self, model: str, why: str, progress: Progress | None) -> None:
        detail = "" if progress is None or progress.plain else " (tool calls or reasoning are not resumed)"
        self.manager.runtime.events("stream.resume_failed", model, f"a broken answer ended: {why}{detail}",
                                    cause=why)

    async def load_only(self, model: str, ctx: int | None, keep_alive_s: float | None, info: RunInfo) -> str:
        """Ollama's empty prompt: load (or, with keep_alive 0, unload). Returns the done_reason."""
        if keep_alive_s == 0:
            deployment = self.manager.find(model)
            if deployment is not None:
                await deployment.unload("unloaded on request (keep_alive 0)")
            return "unload"
        deployment = self.manager.deployment(model)
        lease = await deployment.acquire(ctx or self.manager.planner.default_ctx)
        info.load_duration_s += lease.load_duration_s
        deployment.release(keep_alive_s)
        return "load"

    async def proxy_to_pool(self, request: web.Request, route: Route, path: str, body: dict[str, Any]) -> web.StreamResponse:
        """Send `body` to the best pool node that answers; stream its reply back byte for byte."""
        errors = []
        for node in route.nodes:
            node.in_flight += 1
            try:
                try:
                    upstream = await self.session.post(f"{node.url}{path}", json=body, timeout=UPSTREAM_TIMEOUT)
                except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                    # This node is gone: mark it and try the next one; nothing was sent yet.
                    self.pool.mark_down(node, f"{type(exc).__name__}: {exc}")
                    errors.append(f"{node.url}: {exc or type(exc).__name__}")
                    continue
                try:
                    response = web.StreamResponse(status=upstream.status)
                    response.content_type = upstream.content_type
                    await response.prepare(request)
                    try:
                        async for chunk in upstream.content.iter_any():
                            try:
                                await response.write(chunk)
                            except ConnectionResetError:
                                # Our client hung up, not the node: one line, and the node stays up.
                                log.info("%s %s: the client closed the connection before the answer ended",
                                         request.method, request.path)
                                return response
                    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                        # Cut mid-answer: say so in the stream, the way this API's clients read it.
                        self.pool.mark_down(node, str(exc))
                        await response.write(late_error(f"the Ollama node {node.url} dropped the connection",
                                                        path.startswith("/v1/")))
                    await response.write_eof()
                    return response
                finally:
                    upstream.release()
            finally:
                node.in_flight -= 1
        raise PoolUnavailable(f"no Ollama pool node could serve {body.get('model')}: {'; '.join(errors)}")
