"""What every HTTP route of the controller shares: JSON bodies, and errors as JSON with the right status.

Domain errors map to statuses in one table. Ollama's routes and our own answer
`{"error": "..."}`; OpenAI's routes answer OpenAI's `{"error": {"message", "type", "code"}}`, which
its clients parse. Nothing raises out of a handler as a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.controller.access import (
    SAFE_METHODS,
    Access,
    is_allowed_origin,
    is_inference_path,
    is_loopback_host,
    is_loopback_peer,
    is_same_origin,
    route_access,
)
from llamafleet.controller.coordinator.deployment import DoesNotFit, ShuttingDown
from llamafleet.controller.coordinator.process import CoordinatorExited
from llamafleet.controller.estimate import EstimateError
from llamafleet.controller.events import EventSink
from llamafleet.controller.gateway.fairness import VALID_KEY
from llamafleet.controller.gateway.pool import PoolUnavailable
from llamafleet.controller.gateway.upstream import UpstreamGarbage, UpstreamRejected, UpstreamUnavailable
from llamafleet.controller.gguf import GGUFError
from llamafleet.controller.metrics import ControllerMetrics
from llamafleet.controller.models import InvalidModelName, ModelNotFound
from llamafleet.controller.pull import PullRefused
from llamafleet.controller.store import StateNotWritable

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")


class BodyTooLarge(UsageError):
    """The request body is over the configured limit (413)."""


# Domain errors → HTTP status, in one place. Subclasses first.
_STATUS: list[tuple[type[LlamafleetError], int]] = [
    (BodyTooLarge, 413), (InvalidModelName, 400), (UsageError, 400), (ModelNotFound, 404), (DoesNotFit, 507), (ShuttingDown, 503), (StateNotWritable, 503),
    (PullRefused, 409), (GGUFError, 422), (EstimateError, 422), (CoordinatorExited, 503), (UpstreamUnavailable, 502), (UpstreamGarbage, 502),
    (PoolUnavailable, 502), (LlamafleetError, 500),
]


# A disk that refuses writes: full, over quota, read-only, failing.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def status_for(exc: LlamafleetError) -> int:
    if isinstance(exc, UpstreamRejected):
        return exc.status if 400 <= exc.status < 500 else 502
    return next(code for kind, code in _STATUS if isinstance(exc, kind))


# An absolute file path in a message (not one of our own routes): the server's layout is not an
# API client's business. The controller's log keeps the full text.
_SERVER_PATH = re.compile(r"(?<![\w.:/-])/(?!api/|v1/|llamafleet/)[\w.@+~-]+(?:/[\w.@+~-]*)+")


def without_paths(message: str) -> str:
    return _SERVER_PATH.sub("<path>", message)


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
        return error(status, without_paths(exc.message) if is_inference_path(request.path) else exc.message, openai)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason or "error", openai)
    except sqlite3.Error as exc:
        # The state dir full or read-only under a write nobody wrapped: the cause, not a traceback.
        log.error("%s %s: the controller's state database refused a write: %s", request.method, request.path, exc)
        return error(503, f"the controller cannot write its state: {exc}", openai)
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        log.error("%s %s: %s", request.method, request.path, exc)
        return error(503, f"the controller cannot write its state: {exc.strerror}", openai)


# The routes that hold a model's slot, a place in its queue or a coordinator's start for a client.
GENERATION_PATHS = frozenset({"/api/chat", "/api/generate", "/api/embed", "/api/embeddings",
                              "/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
# How often a generation checks that its client is still there (aiohttp tells no one; it only
# drops the transport when the peer closes).
CLIENT_GONE_POLL_S = 0.25


def client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def cancel_when_client_gone(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A generation whose client hung up ends there, wherever it waits: its turn at the slots
    (it leaves the queue), a coordinator's start, llama-server's next token (the connection to
    llama-server closes, and llama-server stops working for nobody). Without this a request whose
    client had gone waited its turn, then made the coordinator evaluate its prompt, and one that
    waited on a silent coordinator held its slot for ever (there is no read timeout upstream)."""
    if request.method != "POST" or request.path not in GENERATION_PATHS:
        return await handler(request)
    work = asyncio.ensure_future(handler(request))
    try:
        while True:
            done, _ = await asyncio.wait({work}, timeout=CLIENT_GONE_POLL_S)
            if done:
                return work.result()
            if client_gone(request):
                break
    finally:
        if not work.done():
            work.cancel()
            # Its `finally` blocks run (the lease goes back, the queue forgets it) before we go on.
            await asyncio.wait({work})
    if not work.cancelled() and (exc := work.exception()) is not None:
        log.info("%s %s: ended as its client left: %s", request.method, request.path, exc)
    log.info("%s %s: the client hung up before the answer ended", request.method, request.path)
    return web.Response(status=499, text="the client hung up")  # read by nobody: its connection is gone


def read_api_keys(path: Path, what: str = "API key") -> tuple[str, ...]:
    """One key per line; blank lines and `#` comments skipped. An empty file is refused."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read {what} file {path}: {exc.strerror}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise UsageError(f"{what} file {path} holds no key")
    return keys


@dataclass(frozen=True)
class HttpKeys:
    """What the gateway accepts. None: that kind of key is not configured."""

    api_keys: tuple[str, ...] | None
    admin_keys: tuple[str, ...] | None
    listen_host: str  # a Host naming it is as good as a loopback name (see access.is_loopback_host)
    origins: tuple[str, ...] = ()  # --origins: more browser origins for the Ollama/OpenAI routes

    def identify(self, authorization: str) -> str | None:
        """The kind of key an `Authorization` header value presents: "admin", "api", or None."""
        presented = authorization.encode()
        # Every key is compared, in constant time, so timing tells nothing about which one is near.
        admin = [hmac.compare_digest(presented, f"Bearer {k}".encode()) for k in self.admin_keys or ()]
        api = [hmac.compare_digest(presented, f"Bearer {k}".encode()) for k in self.api_keys or ()]
        return "admin" if any(admin) else "api" if any(api) else None


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # short and fixed: the event's `reason`, what a dashboard or alert matches on
    message: str  # what the client is told


def route_template(request: web.Request) -> str:
    """The matched route's template, so a check judges the route that will run, not path text."""
    resource = request.match_info.route.resource
    # No route matched (a 404 or 405 to come): the raw path, percent-encoded, so no newline
    # or control character from the request reaches a log line.
    return resource.canonical if resource is not None else request.raw_path.split("?", 1)[0][:200]


def peer_address(request: web.Request) -> str | None:
    """The address the connection came from, from the socket (never X-Forwarded-For)."""
    peername = request.transport.get_extra_info("peername") if request.transport is not None else None
    return str(peername[0]) if isinstance(peername, tuple) and peername else None


def judge(request: web.Request, credentials: HttpKeys) -> Refusal | None:
    """None when `request` may reach its handler, else why not. No side effect."""
    template = route_template(request)
    access = route_access(request.method, template)
    if access is Access.PUBLIC:
        return None
    authorization = request.headers.get("Authorization", "")
    kind = credentials.identify(authorization) if authorization else None
    host = request.headers.get("Host")
    origin = request.headers.get("Origin")
    if access is Access.INFERENCE:
        # As Ollama: a page from another site may not drive the API from a visitor's browser (an
        # `keep_alive: 0` unloads a model, a large load evicts others), a page on this host may.
        if origin is not None and not (is_same_origin(origin, host) or is_allowed_origin(origin, credentials.origins)):
            return Refusal(403, "cross-origin", f"requests from web pages of {origin[:100]} are refused")
        if (is_loopback_host(credentials.listen_host, "") and not is_loopback_host(host, credentials.listen_host)):
            # Listening on loopback only, the one way in by another name is DNS rebinding.
            return Refusal(403, "host not loopback", "this controller listens on loopback: requests must be "
                                                     "addressed to localhost or a loopback address (Host)")
        if credentials.api_keys is None or kind is not None:
            # Without API keys the Ollama/OpenAI routes are open, as Ollama's are: whatever a
            # client sends (the OpenAI SDK always sends some key) is not judged.
            return None
        return Refusal(401, "wrong api key" if authorization else "missing api key",
                       "missing or wrong API key (Authorization: Bearer KEY)")
    if origin is not None and not is_same_origin(origin, host):
        return Refusal(403, "cross-origin", "cross-origin requests to control routes are refused")
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        # A browser that names no Origin (a link, an <img>) still says where the page came from.
        return Refusal(403, "cross-origin", "cross-origin requests to control routes are refused")
    if credentials.admin_keys is not None:
        if kind == "api":
            return Refusal(403, "api key on a control route",
                           "an API key opens the Ollama/OpenAI routes only: control routes need an admin key "
                           "($LLAMAFLEET_ADMIN_KEY)")
        if kind is None:
            return Refusal(401, "wrong admin key" if authorization else "missing admin key",
                           "missing or wrong admin key: control routes need Authorization: Bearer ADMIN_KEY "
                           "(the CLI sends $LLAMAFLEET_ADMIN_KEY)")
    else:
        # No admin key configured: the socket's peer is the credential, and a key sent along
        # (the dashboard sends its API key everywhere) neither opens nor closes a control route.
        if not is_loopback_peer(peer_address(request)):
            return Refusal(401, "not loopback",
                           "control routes need an admin key, and none is configured (--admin-key-file): "
                           "only clients on the controller's own host may use them")
        if not is_loopback_host(host, credentials.listen_host):
            return Refusal(403, "host not loopback",
                           "without an admin key, control requests must be addressed to localhost or a "
                           "loopback address (Host), not another name")
    if request.method not in SAFE_METHODS and request.content_type != "application/json":
        # A web page can send a text/plain or form POST anywhere without asking first; JSON it cannot.
        return Refusal(415, "not json", "control requests that change something must be Content-Type: "
                                        "application/json")
    return None


class RefusalLog:
    """Logs each refusal and records it as an `auth.refused` event, at a bounded rate per peer.

    Every refusal would otherwise be a log line and a SQLite write that anyone who reaches the
    port can cause, and a flood would push the fleet's real events out of the kept 10,000.
    """

    BURST = 30
    REFILL_S = 2.0  # after the burst, one more per 2 s: thirty a minute per peer
    MAX_PEERS = 4096

    def __init__(self, events: EventSink, clock: Callable[[], float] = time.monotonic) -> None:
        self._events = events
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float, int]] = OrderedDict()  # tokens, at, suppressed

    def __call__(self, request: web.Request, refusal: Refusal) -> None:
        peer = peer_address(request) or "unknown"
        now = self._clock()
        tokens, at, suppressed = self._buckets.pop(peer, (float(self.BURST), now, 0))
        tokens = min(float(self.BURST), tokens + (now - at) / self.REFILL_S)
        if tokens < 1:
            self._buckets[peer] = (tokens, now, suppressed + 1)
        else:
            route = f"{request.method} {route_template(request)}"
            # Never the key presented: a near-miss key is still a secret.
            log.warning("refused %s from %s: %s%s", route, peer, refusal.reason,
                        f" ({suppressed} more refused, not logged)" if suppressed else "")
            self._events("auth.refused", route, f"{refusal.reason} from {peer}", route=route, peer=peer,
                         reason=refusal.reason, status=refusal.status, suppressed=suppressed)
            self._buckets[peer] = (tokens - 1, now, 0)
        while len(self._buckets) > self.MAX_PEERS:
            self._buckets.popitem(last=False)


def guard(credentials: HttpKeys, events: EventSink) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: every request is judged (see controller/access.py) before its handler runs."""
    refused = RefusalLog(events)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        refusal = judge(request, credentials)
        if refusal is None:
            authorization = request.headers.get("Authorization", "")
            if authorization and credentials.identify(authorization):
                # Only a key we issued names a client (fair turns): any other header is free to invent.
                request[VALID_KEY] = authorization
            return await handler(request)
        refused(request, refusal)
        return error(refusal.status, refusal.message, request.path.startswith("/v1/"))

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
    except ConnectionResetError:
        # The client hung up mid-answer (a stop button, a closed tab): its business, not an error.
        # Leaving here closes `items`, and with it the request to the coordinator.
        log.info("%s %s: the client closed the connection before the answer ended", request.method, request.path)
        if response is None:
            raise
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
