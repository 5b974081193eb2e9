"""OpenAI's API (`/v1/*`) over the fleet: passed through to llama-server with an allow-list.

llama-server speaks this API itself, so requests go through nearly as they are: only fields on
the allow-list travel (others are dropped, logged once per name and counted, as Ollama ignores
them), and the `model` in every answer is the name the client asked for (not llama-server's
file path). `reasoning_effort` is read as Ollama's /v1 reads it, as `think`, and travels as the
same reasoning switches /api/chat sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web
from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.gateway.catalog import Catalog
from llamafleet.controller.gateway.dispatch import Dispatcher, Resume, run_info
from llamafleet.controller.gateway.fairness import client_of
from llamafleet.controller.gateway.options import (
    OPENAI_CHAT_FIELDS,
    OPENAI_COMPLETION_FIELDS,
    BadRequest,
    IgnoredNames,
    openai_body,
    openai_think,
    reasoning_fields,
)
from llamafleet.controller.gateway.resume import (
    OPENAI_NOT_RESUMABLE,
    OPENAI_NOT_SAMPLING,
    Progress,
    ResumeSpec,
    continuation,
)
from llamafleet.controller.gateway.upstream import (
    CHAT_TRACKING,
    Final,
    chat_event_token,
    checked_openai,
    one_answer,
    sse_events,
)
from llamafleet.controller.models import ModelNotFound, parse_model_name
from llamafleet.controller.web import json_body, stream_items, string_field


def _sse(doc: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _resumable(body: dict[str, Any]) -> bool:
    return bool(body.get("stream")) and not any(body.get(key) not in (None, False, [], {}) for key in OPENAI_NOT_RESUMABLE)


def _resume_spec(body: dict[str, Any]) -> ResumeSpec:
    sampling = {k: v for k, v in body.items() if k not in OPENAI_NOT_SAMPLING and v is not None}
    n_predict = body.get("max_completion_tokens") or body.get("max_tokens") or -1
    if "messages" in body:
        return ResumeSpec(sampling, int(n_predict), messages=body["messages"])
    return ResumeSpec(sampling, int(n_predict), prompt=str(body.get("prompt") or ""))


class _Chunks:
    """The continuation of a resumed OpenAI stream, as the chunks llama-server would have sent."""

    def __init__(self, body: dict[str, Any], chat: bool) -> None:
        self.chat = chat
        self.usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.head: dict[str, Any] = {"id": "", "created": int(time.time())}

    def seen(self, event: dict[str, Any]) -> None:
        if not self.head["id"] and event.get("id"):
            self.head = {"id": event["id"], "created": event.get("created", self.head["created"])}

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self.head | {"object": kind, "choices": [choice], **extra}

    def of(self, piece: str | Final, resumed: int) -> list[dict[str, Any]]:
        if isinstance(piece, str):
            content = {"delta": {"content": piece}} if self.chat else {"text": piece, "logprobs": None}
            return [self._chunk({"index": 0, **content, "finish_reason": None})]
        end: dict[str, Any] = {"delta": {}} if self.chat else {"text": "", "logprobs": None}
        out = [self._chunk({"index": 0, **end, "finish_reason": piece.done_reason}, resumed=resumed)]
        if self.usage:
            out.append(self.head | {"object": out[0]["object"], "choices": [], "usage": {
                "prompt_tokens": piece.prompt_tokens, "completion_tokens": piece.predicted_tokens,
                "total_tokens": piece.prompt_tokens + piece.predicted_tokens}})
        return out


def make_routes(dispatcher: Dispatcher, catalog: Catalog, max_body_bytes: int) -> web.RouteTableDef:
    routes = web.RouteTableDef()
    models = dispatcher.manager.planner.models
    metrics = dispatcher.metrics
    ignored = IgnoredNames("openai", metrics.count_ignored if metrics is not None else None)

    async def passthrough(request: web.Request, allowed: frozenset[str], path: str) -> web.StreamResponse:
        body = openai_body(await json_body(request, max_body_bytes), allowed, ignored)
        model = string_field(body, "model")
        parse_model_name(model)
        think = openai_think(body)
        route = dispatcher.route(model)
        if route.target == "pool":
            return await dispatcher.proxy_to_pool(request, route, request.path, body)  # Ollama reads it itself
        body.pop("reasoning_effort", None)
        body.pop("reasoning", None)
        if think is not None:
            # As /api/chat's `think`: refused for a model whose template cannot think (Ollama's
            # 400), `think: false` there is a no-op; a thinking answer is not resumed.
            capabilities = (await asyncio.to_thread(catalog.card, models.resolve(model))).capabilities
            if think is not False and "thinking" not in capabilities:
                raise BadRequest(f'"{model}" does not support thinking')
            if "thinking" in capabilities:
                body |= reasoning_fields(think)
        stream = bool(body.get("stream"))
        info = run_info(request, client_of(request))
        session = dispatcher.session
        resume = None
        if dispatcher.resume_policy.enabled and _resumable(body) and think is None:
            progress, spec, chunks = Progress(), _resume_spec(body), _Chunks(body, "messages" in body)

            async def tracked(url: str) -> AsyncGenerator[dict[str, Any]]:
                # The same events, with the id of every token recorded (and its logprobs, which
                # the client did not ask for, taken out again).
                async for event in sse_events(session, f"{url}{path}", body | CHAT_TRACKING):
                    checked_openai(event, chunk=True)
                    chunks.seen(event)
                    chat_event_token(event, progress)
                    for choice in event.get("choices") or []:
                        if isinstance(choice, dict):
                            choice.pop("logprobs", None)
                    yield event

            async def resumed(url: str) -> AsyncGenerator[dict[str, Any]]:
                async for piece in continuation(session, url, spec, progress):
                    for chunk in chunks.of(piece, info.resumed):
                        yield chunk
            resume = Resume(progress, resumed)

        async def checked(events: AsyncGenerator[dict[str, Any]]) -> AsyncGenerator[dict[str, Any]]:
            async with contextlib.aclosing(events):
                async for event in events:
                    yield checked_openai(event, chunk=stream)

        def open_stream(url: str) -> AsyncGenerator[dict[str, Any]]:
            if resume is not None:
                return tracked(url)
            if stream:
                return checked(sse_events(session, f"{url}{path}", body))
            return checked(one_answer(session, f"{url}{path}", body))
        events = dispatcher.fleet_stream(model, None, None, open_stream, info, resume)
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

    @routes.get("/v1/models/{model:.+}")  # names may have a namespace (user/model)
    async def one_model(request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name in dispatcher.pool.models():
            return web.json_response({"id": name, "object": "model", "created": 0, "owned_by": "ollama-pool"})
        resolved = models.resolve(name)  # ModelNotFound: OpenAI's 404
        try:
            created = int(resolved.path.stat().st_mtime)
        except OSError:
            raise ModelNotFound(f"model '{name}' not found") from None
        # The id as asked (what Ollama answers, and what a client compares with what it asked).
        return web.json_response({"id": name, "object": "model", "created": created, "owned_by": "llamafleet"})

    return routes

