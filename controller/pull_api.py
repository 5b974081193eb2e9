"""The routes of pulls and of who holds what: `POST /llamafleet/v1/pull`, `GET /llamafleet/v1/pulls`,
`GET /llamafleet/v1/models`. Control routes, guarded like the others (controller/access.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from llamafleet.common.errors import UsageError
from llamafleet.controller.api import MAX_BODY_BYTES, PREFIX
from llamafleet.controller.holders import Holders, find_holders
from llamafleet.controller.inventory import Inventory, validate_address
from llamafleet.controller.models import parse_model_name
from llamafleet.controller.planner import Planner
from llamafleet.controller.pull import Pull, PullManager
from llamafleet.controller.web import json_body, string_field

MAX_NODES = 1000
PULL_FIELDS = frozenset({"model", "nodes", "name", "stream"})
# How often a pull checks that the client that asked for it is still connected.
GONE_POLL_S = 0.5


def _pull_request(body: dict[str, Any]) -> tuple[str, list[str], str, bool]:
    unknown = sorted(set(body) - PULL_FIELDS)
    if unknown:
        raise UsageError(f"unknown field '{unknown[0]}' (a pull takes {', '.join(sorted(PULL_FIELDS))})")
    model = string_field(body, "model")
    nodes = body.get("nodes", [])
    if not isinstance(nodes, list) or len(nodes) > MAX_NODES or not all(isinstance(n, str) and n for n in nodes):
        raise UsageError("'nodes' must be a list of node addresses (HOST:PORT)")
    for address in nodes:
        validate_address(address)
    name = body.get("name", "")
    if not isinstance(name, str):
        raise UsageError("'name' must be a string: the model's name in the nodes' models dirs")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise UsageError("'stream' must be true or false")
    return model, nodes, name, stream


async def _cancel_when_gone(request: web.Request, pull: Pull) -> None:
    """A pull lives as long as its request: a client that went away (Ctrl-C) cancels it."""
    while not pull.finished:
        transport = request.transport
        if transport is None or transport.is_closing():
            pull.cancel("the client went away")
            return
        await asyncio.sleep(GONE_POLL_S)


def pull_routes(pulls: PullManager, planner: Planner, inventory: Inventory) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.post(f"{PREFIX}/pull")
    async def pull(request: web.Request) -> web.StreamResponse:
        """NDJSON progress, as Ollama's /api/pull streams it; `"stream": false` answers the outcome alone."""
        model, nodes, name, stream = _pull_request(await json_body(request, MAX_BODY_BYTES))
        started = pulls.start(model, nodes, name)
        assert started.task is not None  # start() always starts it
        watcher = asyncio.create_task(_cancel_when_gone(request, started), name=f"pull {started.id} client")
        try:
            if not stream:
                await asyncio.wait({started.task})
                outcome = started.outcome()
                return web.json_response(outcome, status=200 if outcome["status"] == "success" else 502)
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                async for line in started.progress():
                    await response.write(json.dumps(line).encode() + b"\n")
            except ConnectionResetError:
                started.cancel("the client went away")
                return response
            await response.write_eof()
            return response
        except asyncio.CancelledError:
            started.cancel("the request was cancelled")
            raise
        finally:
            watcher.cancel()

    @routes.get(f"{PREFIX}/pulls")
    async def list_pulls(request: web.Request) -> web.Response:
        return web.json_response(pulls.describe())

    @routes.get(f"{PREFIX}/models")
    async def models(request: web.Request) -> web.Response:
        """Every model of the catalog, its sha256 when known, and the nodes that hold it or are being sent it."""
        views = inventory.node_views()
        docs: dict[str, dict[str, Any]] = {}
        for resolved in planner.models.list():
            key = parse_model_name(resolved.name).short
            if key in docs:
                continue
            doc: dict[str, Any] = {"model": key, "path": str(resolved.path), "source": resolved.source}
            try:
                size = resolved.path.stat().st_size
                digests = planner.digests
                holders = find_holders(resolved.path, views, digests) if digests else Holders.none("")
                sha = holders.sha256 or (digests.known(resolved.path) if digests else None) or ""
            except OSError as exc:
                docs[key] = doc | {"error": f"cannot read {resolved.path}: {exc.strerror or exc}"}
                continue
            docs[key] = doc | {"size_bytes": size, "sha256": sha, "holders": sorted(holders.addresses),
                               "holder_note": holders.note, "pulling": pulls.of(key)}
        return web.json_response(list(docs.values()))

    return routes
