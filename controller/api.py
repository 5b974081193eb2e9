"""The controller's own HTTP API (`/llamafleet/v1/...`), used by the `llamafleet` CLI.

Every error is JSON `{"error": "..."}` with a fitting status (see `controller/web.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from aiohttp import web
from llamafleet.common.errors import UsageError
from llamafleet.controller.coordinator.manager import CoordinatorManager
from llamafleet.controller.events import EventLog
from llamafleet.controller.gateway.router import Router
from llamafleet.controller.credentials import Credentials
from llamafleet.controller.inventory import Inventory, validate_address
from llamafleet.controller.metrics import ControllerMetrics
from llamafleet.controller.planner import Planner, plan_to_json
from llamafleet.controller.pull import PullManager
from llamafleet.controller.web import error, json_body, string_field

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024
PREFIX = "/llamafleet/v1"


MAX_LOG_LINES = 2000
SSE_KEEPALIVE_S = 15.0


def _int_query(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > high:
        raise UsageError(f"'{name}' must be a whole number up to {high}")
    return int(raw)


def tail_lines(path: Path, count: int, max_bytes: int = 256 * 1024) -> list[str]:
    """The last `count` lines of a file, reading no more than its last `max_bytes`."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(handle.tell() - max_bytes, 0))
        data = handle.read()
    return data.decode(errors="replace").splitlines()[-count:]


def make_routes(inventory: Inventory, planner: Planner, manager: CoordinatorManager, router: Router,
                events: EventLog, metrics: ControllerMetrics, credentials: Credentials,
                pulls: PullManager) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/metrics")
    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8")

    @routes.get(f"{PREFIX}/events")
    async def recent_events(request: web.Request) -> web.Response:
        after = _int_query(request, "after", 0, 2**62)
        limit = _int_query(request, "limit", 200, 10_000)
        return web.json_response([e.to_json() for e in events.recent(after, limit)])

    @routes.get(f"{PREFIX}/events/stream")
    async def event_stream(request: web.Request) -> web.StreamResponse:
        """Server-sent events: what came after `after`, then every new event as it happens."""
        after = _int_query(request, "after", 0, 2**62)
        queue = events.subscribe()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            last = after
            for event in events.recent(after, 500):
                await response.write(f"id: {event.id}\ndata: {json.dumps(event.to_json())}\n\n".encode())
                last = event.id
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event.id > last:
                    await response.write(f"id: {event.id}\ndata: {json.dumps(event.to_json())}\n\n".encode())
                    last = event.id
        except ConnectionResetError:
            # The browser went away: the stream simply ends. (A cancel, when the controller
            # stops, is let through: swallowing it would keep the handler's task alive.)
            return response
        finally:
            events.unsubscribe(queue)

    @routes.get(PREFIX + "/logs/{model}")
    async def coordinator_log(request: web.Request) -> web.Response:
        model = request.match_info["model"]
        lines = _int_query(request, "lines", 200, MAX_LOG_LINES)
        path = manager.log_path(model)
        if path is None:
            return error(404, f"no coordinator log for '{model}'")
        return web.json_response({"model": model, "log": str(path), "lines": tail_lines(path, lines)})

    @routes.get(f"{PREFIX}/health")
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get(f"{PREFIX}/nodes")
    async def nodes(request: web.Request) -> web.Response:
        docs = inventory.describe()
        serving = manager.serving()
        for doc in docs:
            # Which model each rpc-server serves: one coordinator per rpc-server, always.
            for rpc in [doc["rpc_server"] or {}, *(doc["rpc_servers"] or [])]:
                if rpc:
                    rpc["model"] = serving.get(rpc.get("endpoint", ""))
            doc["pulling"] = pulls.into(doc["address"])
        return web.json_response(docs)

    @routes.post(f"{PREFIX}/nodes")
    async def add_node(request: web.Request) -> web.Response:
        body = await json_body(request, MAX_BODY_BYTES)
        address = validate_address(string_field(body, "address"))
        # The agent's own credential, pinned to this address; without one the node is sent nothing.
        credential = body.get("credential")
        if credential is not None:
            credentials.install(address, string_field(body, "credential"))
        added = inventory.add(address)
        if not added and credential is not None:
            await inventory.redial(address)
        return web.json_response({"address": address, "added": added, "credential": credential is not None},
                                 status=201 if added else 200)

    @routes.delete(PREFIX + "/nodes/{address}")
    async def remove_node(request: web.Request) -> web.Response:
        address = request.match_info["address"]
        if inventory.record(address) is None:
            return error(404, f"no node {address}")
        # Told before it is forgotten: afterwards the controller holds nothing to prove itself with.
        revoked, why = await credentials.revoke(address)
        await inventory.remove(address)
        return web.json_response({"address": address, "removed": True, "revoked": revoked, "not_revoked_because": why})

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
        return web.json_response(plan_to_json(resolved, result, warnings, planner.coordinator_protocol)
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
