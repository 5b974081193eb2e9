"""One generation, end to end: to a pool node (proxied as is) or to a coordinator (leased, streamed).

A coordinator request holds a lease, so the model is not unloaded under it, and hands it back
with the request's keep-alive. When the coordinator cannot be reached before anything was sent
to the client (its rpc-server died and took llama-server with it, say), the deployment is told,
and the request is tried once more on the restarted coordinator: the client sees a slower
answer, not an error.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from llamafleet.controller.coordinator.manager import CoordinatorManager, canonical
from llamafleet.controller.gateway.pool import OllamaPool, PoolUnavailable
from llamafleet.controller.gateway.router import Route, Router
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

    @property
    def total_ns(self) -> int:
        return int((time.monotonic() - self.started) * 1e9)


class Dispatcher:
    def __init__(self, manager: CoordinatorManager, router: Router, pool: OllamaPool,
                 session: aiohttp.ClientSession, metrics: ControllerMetrics | None = None) -> None:
        self.manager = manager
        self.router = router
        self.pool = pool
        self.session = session
        self.metrics = metrics

    async def observed(self, model: str, pieces: AsyncIterator[Piece], info: RunInfo) -> AsyncIterator[Piece]:
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
                           open_stream: Callable[[str], AsyncIterator[T]], info: RunInfo) -> AsyncIterator[T]:
        """Yield what `open_stream(coordinator_url)` yields, with a lease held and one retry."""
        deployment = self.manager.deployment(model)
        ctx = ctx or self.manager.planner.default_ctx
        broken = 0  # the incarnation a first try found dead: the retry waits for a newer one
        for last_try in (False, True):
            lease = await deployment.acquire(ctx, after_incarnation=broken)
            produced = False
            try:
                # More requests than slots wait here, in fair turns, rather than in llama-server's
                # first-come queue; the coordinator may have been replaced while this one waited.
                async with self.manager.queue(deployment).turn(info.client):
                    lease = await deployment.refresh(lease, ctx)
                    info.load_duration_s += lease.load_duration_s
                    async for item in open_stream(lease.url):
                        produced = True
                        yield item
                return
            except UpstreamUnavailable as exc:
                if produced or last_try:
                    raise
                log.warning("%s: %s; retrying once after the coordinator recovers", model, exc.message)
                deployment.report_broken(lease.incarnation)
                broken = lease.incarnation
            finally:
                deployment.release(keep_alive_s)

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
                            await response.write(chunk)
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
