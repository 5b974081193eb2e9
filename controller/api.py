"""The controller's own HTTP API (`/llamafleet/v1/...`), used by the `llamafleet` CLI.

Every error is JSON `{"error": "..."}` with a fitting status (see `controller/web.py`).
"""

from __future__ import annotations

import logging

from aiohttp import web

from llamafleet.common.errors import UsageError
from llamafleet.controller.coordinator.manager import CoordinatorManager
from llamafleet.controller.gateway.router import Router
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.planner import Planner, plan_to_json
from llamafleet.controller.web import error, json_body, string_field

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
PREFIX = "/llamafleet/v1"


def make_routes(inventory: Inventory, planner: Planner, manager: CoordinatorManager, router: Router) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get(f"{PREFIX}/health")
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get(f"{PREFIX}/nodes")
    async def nodes(request: web.Request) -> web.Response:
        return web.json_response(inventory.describe())

    @routes.post(f"{PREFIX}/nodes")
    async def add_node(request: web.Request) -> web.Response:
        address = string_field(await json_body(request, MAX_BODY_BYTES), "address")
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
        enabled = (await json_body(request, MAX_BODY_BYTES)).get("enabled", True)
        if not isinstance(enabled, bool):
            raise UsageError("'enabled' must be true or false")
        if not inventory.set_maintenance(address, enabled):
            return error(404, f"no node {address}")
        return web.json_response({"address": address, "maintenance": enabled})

    @routes.post(f"{PREFIX}/plan")
    async def plan(request: web.Request) -> web.Response:
        body = await json_body(request, MAX_BODY_BYTES)
        model = string_field(body, "model")
        ctx = body.get("ctx")
        if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool)):
            raise UsageError("'ctx' must be an integer")
        resolved, result, warnings = planner.plan(model, ctx)
        protocol = planner.coordinator.rpc_protocol_version if planner.coordinator else None
        return web.json_response(plan_to_json(resolved, result, warnings, protocol)
                                 | {"route": router.route(model, ctx).to_json()})

    @routes.get(f"{PREFIX}/pool")
    async def pool(request: web.Request) -> web.Response:
        return web.json_response([node.describe() for node in router.pool.nodes])

    @routes.get(f"{PREFIX}/ps")
    async def ps(request: web.Request) -> web.Response:
        return web.json_response(manager.describe())

    @routes.post(f"{PREFIX}/stop")
    async def stop(request: web.Request) -> web.Response:
        model = string_field(await json_body(request, MAX_BODY_BYTES), "model")
        deployment = manager.find(model)
        if deployment is None or not deployment.running:
            return error(404, f"model '{model}' is not loaded")
        await deployment.unload("stopped by the operator")
        return web.json_response({"model": deployment.model, "state": deployment.state.value})

    return routes
