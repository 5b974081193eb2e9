"""What every HTTP route of the controller shares: JSON bodies, and errors as JSON with the right status.

Domain errors map to statuses in one table. Ollama's routes and our own answer
`{"error": "..."}`; OpenAI's routes answer OpenAI's `{"error": {"message", "type", "code"}}`, which
its clients parse. Nothing raises out of a handler as a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.controller.coordinator.deployment import DoesNotFit
from llamafleet.controller.coordinator.process import CoordinatorExited
from llamafleet.controller.estimate import EstimateError
from llamafleet.controller.gateway.pool import PoolUnavailable
from llamafleet.controller.gateway.upstream import UpstreamRejected, UpstreamUnavailable
from llamafleet.controller.gguf import GGUFError
from llamafleet.controller.models import InvalidModelName, ModelNotFound

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Domain errors → HTTP status, in one place. Subclasses first.
_STATUS: list[tuple[type[LlamafleetError], int]] = [
    (InvalidModelName, 400), (UsageError, 400), (ModelNotFound, 404), (DoesNotFit, 507),
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


async def json_body(request: web.Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, at most `limit` bytes, or a 400 that says what is wrong."""
    if request.content_length is not None and request.content_length > limit:
        raise UsageError(f"request body larger than {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise UsageError(f"request body larger than {limit} bytes")
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
