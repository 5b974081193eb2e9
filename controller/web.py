"""What every HTTP route of the controller shares: JSON bodies, and errors as JSON with the right status.

Domain errors map to statuses in one table. Ollama's routes and our own answer
`{"error": "..."}`; OpenAI's routes answer OpenAI's `{"error": {"message", "type", "code"}}`, which
its clients parse. Nothing raises out of a handler as a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.controller.coordinator.deployment import DoesNotFit
from llamafleet.controller.coordinator.process import CoordinatorExited
from llamafleet.controller.estimate import EstimateError
from llamafleet.controller.gateway.pool import PoolUnavailable
from llamafleet.controller.gateway.upstream import UpstreamRejected, UpstreamUnavailable
from llamafleet.controller.gguf import GGUFError
from llamafleet.controller.metrics import ControllerMetrics
from llamafleet.controller.models import InvalidModelName, ModelNotFound

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class BodyTooLarge(UsageError):
    """The request body is over the configured limit (413)."""


# Domain errors → HTTP status, in one place. Subclasses first.
_STATUS: list[tuple[type[LlamafleetError], int]] = [
    (BodyTooLarge, 413), (InvalidModelName, 400), (UsageError, 400), (ModelNotFound, 404), (DoesNotFit, 507),
    (GGUFError, 422), (EstimateError, 422), (CoordinatorExited, 503), (UpstreamUnavailable, 502),
    (PoolUnavailable, 502), (LlamafleetError, 500),
]


def status_for(exc: LlamafleetError) -> int:
    if isinstance(exc, UpstreamRejected):
        return exc.status if 400 <= exc.status < 500 else 502
    return next(code for kind, code in _STATUS if isinstance(exc, kind))


def error(status: int, message: str, openai: bool = False) -> web.Response:
    if openai:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status)
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    openai = request.path.startswith("/v1/")
    try:
        return await handler(request)
    except LlamafleetError as exc:
        # The caller's mistake, the model's, or a backend's: a status and one line, never a traceback.
        status = status_for(exc)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return error(status, exc.message, openai)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason or "error", openai)


# Reachable without a key: liveness checks and Ollama's version probe, which clients send first;
# and the agents' join, whose join token is its credential (controller/join.py checks it).
PUBLIC_ROUTES = frozenset({("GET", "/"), ("HEAD", "/"), ("GET", "/api/version"), ("HEAD", "/api/version"),
                           ("GET", "/llamafleet/v1/health"), ("POST", "/llamafleet/v1/join")})


def read_api_keys(path: Path) -> tuple[str, ...]:
    """One key per line; blank lines and `#` comments skipped. An empty file is refused."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read API key file {path}: {exc.strerror}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise UsageError(f"API key file {path} holds no key")
    return keys


def require_api_key(keys: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: `Authorization: Bearer KEY` on every route but the public ones."""
    expected = [f"Bearer {k}".encode() for k in keys]

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) in PUBLIC_ROUTES or (
                request.method in ("GET", "HEAD") and (request.path == "/ui" or request.path.startswith("/ui/"))):
            # The dashboard's own files hold no data: it asks for the key before it reads any.
            return await handler(request)
        presented = request.headers.get("Authorization", "").encode()
        # Every key is compared, in constant time, so timing tells nothing about which one is near.
        if any([hmac.compare_digest(presented, e) for e in expected]):
            return await handler(request)
        # Never log what was presented: a near-miss key is still a secret.
        log.warning("refused %s %s from %s: %s API key", request.method, request.path, request.remote,
                    "wrong" if presented else "missing")
        return error(401, "missing or wrong API key (Authorization: Bearer KEY)", request.path.startswith("/v1/"))

    return check


def count_requests(metrics: ControllerMetrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware (outermost): every answer counted by API and status."""

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        api = ("openai" if path.startswith("/v1/") else "control" if path.startswith("/llamafleet/")
               else "ui" if path.startswith("/ui") else "metrics" if path == "/metrics" else "ollama")
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            metrics.requests.labels(api, str(exc.status)).inc()
            raise
        metrics.requests.labels(api, str(response.status)).inc()
        return response

    return count


def late_error(message: str, openai: bool) -> bytes:
    """An error after the first piece of a stream: in-band, the way each API's clients read it."""
    if openai:
        return b"data: " + json.dumps({"error": {"message": message, "type": "server_error"}}).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


async def stream_items(request: web.Request, items: AsyncIterator[T], content_type: str,
                       encode: Callable[[T], bytes], trailer: bytes = b"") -> web.StreamResponse:
    """Stream `items`. The response starts with the first item, so an error before it still gets
    its own status; an error after it ends the stream with an in-band error, never a silent cut."""
    response: web.StreamResponse | None = None
    try:
        async for item in items:
            if response is None:
                response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
                await response.prepare(request)
            await response.write(encode(item))
    except LlamafleetError as exc:
        if response is None:
            raise
        await response.write(late_error(exc.message, request.path.startswith("/v1/")))
    else:
        if response is None:
            raise LlamafleetError("the coordinator sent nothing")
        await response.write(trailer)
    await response.write_eof()
    return response


async def json_body(request: web.Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, at most `limit` bytes, or a 400 that says what is wrong."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise BodyTooLarge(f"request body larger than {limit} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError("the JSON body must be an object")
    return body


def string_field(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"'{key}' must be a non-empty string")
    return value
