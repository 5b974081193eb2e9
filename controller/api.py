"""The controller's own HTTP API (`/llamafleet/v1/...`), used by the `llamafleet` CLI.

Every error is JSON `{"error": "..."}` with a fitting status; nothing raises out of a handler.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.controller.estimate import EstimateError
from llamafleet.controller.gguf import GGUFError
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.models import InvalidModelName, ModelNotFound
from llamafleet.controller.planner import Planner, plan_to_json

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
PREFIX = "/llamafleet/v1"
# Domain errors → HTTP status, in one place. Subclasses first.
_STATUS: list[tuple[type[LlamafleetError], int]] = [
    (InvalidModelName, 400), (UsageError, 400), (ModelNotFound, 404),
    (GGUFError, 422), (EstimateError, 422), (LlamafleetError, 409),
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LlamafleetError as exc:
        # The operator's mistake or the model's: a status and one line, never a traceback.
        return error(next(code for kind, code in _STATUS if isinstance(exc, kind)), exc.message)
    except web.HTTPException as exc:
        return error(exc.status, exc.reason or "error")


async def json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise UsageError(f"request body larger than {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise UsageError(f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError("the JSON body must be an object")
    return body


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise UsageError(f"'{key}' must be a non-empty string")
    return value


def make_app(inventory: Inventory, planner: Planner) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get(f"{PREFIX}/nodes")
    async def nodes(request: web.Request) -> web.Response:
        return web.json_response(inventory.describe())

    @routes.post(f"{PREFIX}/nodes")
    async def add_node(request: web.Request) -> web.Response:
        address = _string(await json_body(request), "address")
        added = inventory.add(address)
        return web.json_response({"address": address, "added": added}, status=201 if added else 200)

    @routes.delete(PREFIX + "/nodes/{address}")
    async def remove_node(request: web.Request) -> web.Response:
        address = request.match_info["address"]
        if not await inventory.remove(address):
            return error(404, f"no node {address}")
        return web.json_response({"address": address, "removed": True})

    @routes.post(PREFIX + "/nodes/{address}/maintenance")
    async def maintenance(request: web.Request) -> web.Response:
        address = request.match_info["address"]
        enabled = (await json_body(request)).get("enabled", True)
        if not isinstance(enabled, bool):
            raise UsageError("'enabled' must be true or false")
        if not inventory.set_maintenance(address, enabled):
            return error(404, f"no node {address}")
        return web.json_response({"address": address, "maintenance": enabled})

    @routes.post(f"{PREFIX}/plan")
    async def plan(request: web.Request) -> web.Response:
        body = await json_body(request)
        model = _string(body, "model")
        ctx = body.get("ctx")
        if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool)):
            raise UsageError("'ctx' must be an integer")
        resolved, result, warnings = planner.plan(model, ctx)
        protocol = planner.coordinator.rpc_protocol_version if planner.coordinator else None
        return web.json_response(plan_to_json(resolved, result, warnings, protocol))

    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY_BYTES)
    app.add_routes(routes)
    return app
