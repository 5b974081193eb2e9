"""OpenAI's API (`/v1/*`) over the fleet: passed through to llama-server with an allow-list.

llama-server speaks this API itself, so requests go through nearly as they are: only fields on
the allow-list travel, and the `model` in every answer is the name the client asked for (not
llama-server's file path).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.gateway.dispatch import Dispatcher, RunInfo
from llamafleet.controller.gateway.fairness import client_of
from llamafleet.controller.gateway.options import (
    OPENAI_CHAT_FIELDS,
    OPENAI_COMPLETION_FIELDS,
    openai_body,
)
from llamafleet.controller.gateway.upstream import one_answer, sse_events
from llamafleet.controller.models import parse_model_name
from llamafleet.controller.web import json_body, stream_items, string_field


def _sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def make_routes(dispatcher: Dispatcher, max_body_bytes: int) -> web.RouteTableDef:
    routes = web.RouteTableDef()
    models = dispatcher.manager.planner.models

    async def passthrough(request: web.Request, allowed: frozenset[str], path: str) -> web.StreamResponse:
        body = openai_body(await json_body(request, max_body_bytes), allowed)
        model = string_field(body, "model")
        parse_model_name(model)
        route = dispatcher.route(model)
        if route.target == "pool":
            return await dispatcher.proxy_to_pool(request, route, request.path, body)
        stream = bool(body.get("stream"))
        info = RunInfo(client=client_of(request))

        def open_stream(url: str) -> AsyncIterator[dict[str, Any]]:
            if stream:
                return sse_events(dispatcher.session, f"{url}{path}", body)
            return one_answer(dispatcher.session, f"{url}{path}", body)
        events = dispatcher.fleet_stream(model, None, None, open_stream, info)
        async with contextlib.aclosing(events):
            if not stream:
                async for answer in events:
                    return web.json_response(answer | {"model": model})
                raise LlamafleetError("the coordinator sent no answer")
            return await stream_items(request, events, "text/event-stream",
                                      lambda event: _sse(event | {"model": model}), trailer=b"data: [DONE]\n\n")

    @routes.post("/v1/chat/completions")
    async def chat_completions(request: web.Request) -> web.StreamResponse:
        return await passthrough(request, OPENAI_CHAT_FIELDS, "/v1/chat/completions")

    @routes.post("/v1/completions")
    async def completions(request: web.Request) -> web.StreamResponse:
        return await passthrough(request, OPENAI_COMPLETION_FIELDS, "/v1/completions")

    @routes.get("/v1/models")
    async def list_models(request: web.Request) -> web.Response:
        data, seen = [], set()
        for resolved in models.list():
            name = parse_model_name(resolved.name).short
            if name in seen:
                continue
            seen.add(name)
            with contextlib.suppress(OSError):
                # A file that vanished since listing is simply not listed.
                data.append({"id": name, "object": "model", "created": int(resolved.path.stat().st_mtime),
                             "owned_by": "llamafleet"})
        for name in sorted(dispatcher.pool.models() - seen):
            data.append({"id": name, "object": "model", "created": 0, "owned_by": "ollama-pool"})
        return web.json_response({"object": "list", "data": data})

    return routes

