"""CORS on the Ollama/OpenAI routes, as Ollama does it: browser pages of allowed origins may call them.

Which origins are allowed is `access.is_allowed_origin` (pages on this host, app webviews,
`--origins`); the guard in web.py refuses the others' requests (403), and this module answers
their preflights (`OPTIONS` with `Access-Control-Request-Method`, which carry no credentials and
come before the guard) and puts `Access-Control-Allow-Origin` on the allowed ones' answers,
streamed ones included (set as a response is prepared, before its first byte).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from llamafleet.controller.access import is_allowed_origin, is_inference_path
from llamafleet.controller.web import error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
# Ollama's list: what its own clients and the OpenAI SDKs send from a browser.
ALLOW_HEADERS = ", ".join((
    "Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With", "x-stainless-lang",
    "x-stainless-package-version", "x-stainless-os", "x-stainless-arch", "x-stainless-retry-count",
    "x-stainless-runtime", "x-stainless-runtime-version", "x-stainless-async", "x-stainless-helper-method",
    "x-stainless-timeout",
))
MAX_AGE_S = "43200"  # a preflight is good for 12 hours, as Ollama's


def _is_api(path: str) -> bool:
    return path == "/" or is_inference_path(path)


def preflights(origins: tuple[str, ...]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware, before the guard: a preflight from an allowed origin is a 204, from another a 403."""

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if (request.method != "OPTIONS" or origin is None or "Access-Control-Request-Method" not in request.headers
                or not _is_api(request.path)):
            return await handler(request)
        if not is_allowed_origin(origin, origins):
            return error(403, f"requests from web pages of {origin[:100]} are refused (--origins)",
                         request.path.startswith("/v1/"))
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": ALLOW_METHODS,
                                                 "Access-Control-Allow-Headers": ALLOW_HEADERS,
                                                 "Access-Control-Max-Age": MAX_AGE_S})

    return preflight


def allow_origin_header(origins: tuple[str, ...]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` signal handler: the allowed origin named on every API answer."""

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and _is_api(request.path) and is_allowed_origin(origin, origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")

    return add
