"""Ollama's API (`/api/*`) over the fleet: the same JSON in and out as `ollama serve`.

Requests are checked field by field, as leniently as Ollama: unknown fields, options and message
fields are dropped (never passed on; logged once per name and counted in /metrics), a role's
case is forgiven, `content: null` is empty; a field we use with a wrong type is a 400 naming it.
Then a request is either proxied to an Ollama pool node or turned into a llama-server request on
a coordinator.
Streaming answers are NDJSON, one object per piece, and a final object with Ollama's counts and
durations (nanoseconds) taken from llama-server's own timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.gateway.catalog import Catalog, ModelCard, rfc3339
from llamafleet.controller.gateway.dispatch import Dispatcher, Resume, RunInfo, run_info
from llamafleet.controller.gateway.fairness import client_of
from llamafleet.controller.gateway.options import (
    BadRequest,
    Ignore,
    IgnoredNames,
    ignore_silently,
    keep_alive_seconds,
    THINK_LEVELS,
    ollama_options,
    reasoning_fields,
    response_format,
)
from llamafleet.controller.gateway.resume import Progress, ResumeSpec, continuation
from llamafleet.controller.gateway.upstream import (
    Final,
    Piece,
    Thinking,
    ToolCalls,
    UpstreamRejected,
    chat_pieces,
    completion_pieces,
    one_answer,
)
from llamafleet.controller.models import ModelNotFound, parse_model_name
from llamafleet.controller.web import error, json_body, stream_items, string_field

log = logging.getLogger(__name__)
# The Ollama release whose API this one matches (clients gate features on it); ours is beside it.
OLLAMA_API_VERSION = "0.12.0"
# How long /api/tags waits for the sha256 of files it has not hashed yet (the rest come later).
DIGEST_WAIT_S = 2.0
CHAT_FIELDS = frozenset({"model", "messages", "stream", "format", "options", "keep_alive", "tools", "think"})
GENERATE_FIELDS = frozenset({"model", "prompt", "suffix", "system", "template", "context", "stream", "raw", "format",
                             "images", "options", "keep_alive", "think"})
ROLES = frozenset({"system", "user", "assistant", "tool"})
MESSAGE_FIELDS = frozenset({"role", "content", "images", "tool_calls", "tool_name", "tool_call_id", "thinking"})
PieceDoc = Callable[[str, str, list[dict[str, Any]]], dict[str, Any]]  # content, thinking, tool calls
LLAMAFLEET_VERSION = importlib.metadata.version("llamafleet")


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _known_fields(body: dict[str, Any], allowed: frozenset[str], ignore: Ignore) -> dict[str, Any]:
    """`body` without the fields we do not use (as Ollama, which ignores them); each one reported."""
    for key in body:
        if key not in allowed:
            ignore("field", key)
    return {k: v for k, v in body.items() if k in allowed}


def _unsupported(body: dict[str, Any], key: str, why: str) -> None:
    if body.get(key) not in (None, "", [], False):
        raise BadRequest(f"'{key}' is not supported: {why}")


def _optional_string(message: dict[str, Any], key: str, where: str) -> str:
    value = message.get(key) or ""
    if not isinstance(value, str):
        raise BadRequest(f"{where}.{key} must be a string")
    return value


def _upstream_tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's tool calls (arguments an object) as OpenAI's (arguments JSON text), for the template."""
    if not isinstance(raw, list):
        raise BadRequest(f"{where}.tool_calls must be a list")
    out = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadRequest(f"{where}.tool_calls[{j}].function.name must be a non-empty string")
        name, arguments = function["name"], function.get("arguments") or {}
        if not isinstance(arguments, dict):
            raise BadRequest(f"{where}.tool_calls[{j}].function.arguments must be an object")
        doc: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        call_id = call.get("id")
        if isinstance(call_id, str) and call_id:
            doc["id"] = call_id
        out.append(doc)
    return out


def _tools(raw: Any) -> list[dict[str, Any]]:
    """Ollama's `tools`, rebuilt from the fields a function tool has (nothing else reaches llama-server)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("'tools' must be a list")
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise BadRequest(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        function = tool["function"]
        name, description = function.get("name"), function.get("description") or ""
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(name, str) or not name:
            raise BadRequest(f"tools[{i}].function.name must be a non-empty string")
        if not isinstance(description, str):
            raise BadRequest(f"tools[{i}].function.description must be a string")
        if not isinstance(parameters, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": {"name": name, "description": description,
                                                     "parameters": parameters}})
    return out


def _think(value: Any) -> bool | str | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value in THINK_LEVELS:
        return value
    raise BadRequest(f'invalid think value: {json.dumps(value)} (must be "high", "medium", "low", true, or false)')


def _ollama_tool_calls(piece: ToolCalls) -> list[dict[str, Any]]:
    """llama-server's calls as Ollama's: arguments an object, the call's index beside its name."""
    out = []
    for index, call in enumerate(piece.calls):
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            raise UpstreamRejected(502, f"the model called '{call.name}' with arguments that are not a JSON object")
        doc: dict[str, Any] = {"function": {"index": index, "name": call.name, "arguments": arguments}}
        if call.id:
            doc["id"] = call.id
        out.append(doc)
    return out


def _messages(raw: Any, ignore: Ignore = ignore_silently) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("'messages' must be a list")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        for key in message:
            if key not in MESSAGE_FIELDS:
                ignore("message field", key)
        role, content = message.get("role"), message.get("content")
        if isinstance(role, str):
            role = role.lower()  # "User" is "user" to Ollama's templates too
        if content is None:
            content = ""  # what OpenAI-style clients send beside tool calls
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        if message.get("images"):
            raise BadRequest(f"messages[{i}] has images: this model server does not take images")
        entry: dict[str, Any] = {"role": role, "content": content}
        where = f"messages[{i}]"
        if message.get("tool_calls"):
            if role != "assistant":
                raise BadRequest(f"{where} has tool_calls: only an assistant message makes calls")
            entry["tool_calls"] = _upstream_tool_calls(message["tool_calls"], where)
        if role == "tool":
            # OpenAI's names: templates read the function's name as `name`.
            if tool_name := _optional_string(message, "tool_name", where):
                entry["name"] = tool_name
            if tool_call_id := _optional_string(message, "tool_call_id", where):
                entry["tool_call_id"] = tool_call_id
        if role == "assistant" and (thinking := _optional_string(message, "thinking", where)):
            entry["reasoning_content"] = thinking  # for templates that keep earlier reasoning
        out.append(entry)
    return out


def _stream_flag(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    return stream


def _context(value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in value):
        raise BadRequest("'context' must be a list of token ids (from an earlier /api/generate answer)")
    return value


async def _templated(session: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]]) -> str:
    """The prompt the coordinator's chat template makes of `messages`."""
    async for doc in one_answer(session, f"{url}/apply-template", {"messages": messages}):
        return str(doc.get("prompt") or "")
    return ""


async def _after_context(session: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]],
                         context: list[int], raw: dict[str, Any], state: dict[str, Any]) -> AsyncGenerator[Piece]:
    """An answer after an earlier /api/generate's (deprecated) `context`, made as Ollama makes it:
    that context detokenized in front of this turn's templated prompt, sent as a raw prompt
    (kept in `state["prompt"]` for the answer's own context)."""
    before = ""
    async for doc in one_answer(session, f"{url}/detokenize", {"tokens": context}):
        before = str(doc.get("content") or "")
    state["prompt"] = before + await _templated(session, url, messages)
    pieces = completion_pieces(session, url, raw | {"prompt": state["prompt"]})
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            yield piece


async def _context_of(session: aiohttp.ClientSession, pieces: AsyncGenerator[Piece], messages: list[dict[str, Any]],
                      state: dict[str, Any], out: dict[str, Any]) -> AsyncGenerator[Piece]:
    """`pieces`, with this answer's context put in `out["context"]` before the final piece: the tokens
    of the prompt it answered and of its response, as Ollama makes them. `state["url"]` is the
    coordinator that answered last (a resumed answer's is the healed one)."""
    text: list[str] = []
    async with contextlib.aclosing(pieces):
        async for piece in pieces:
            if isinstance(piece, Final):
                try:
                    url = state["url"]
                    prompt = state.get("prompt") or await _templated(session, url, messages)
                    body = {"content": prompt + "".join(text), "add_special": False, "parse_special": True}
                    async for doc in one_answer(session, f"{url}/tokenize", body):
                        out["context"] = [int(t) for t in doc.get("tokens") or []]
                except LlamafleetError as exc:
                    # The answer is whole; only the deprecated context is missing from it.
                    log.info("no context for an /api/generate answer: %s", exc.message)
            elif isinstance(piece, str):
                text.append(piece)
            yield piece


def _final_fields(final: Final | None, info: RunInfo) -> dict[str, Any]:
    doc: dict[str, Any] = {"done": True, "total_duration": info.total_ns,
                           "load_duration": int(info.load_duration_s * 1e9)}
    if final is not None:
        doc |= {
            "done_reason": final.done_reason,
            "prompt_eval_count": final.prompt_tokens,
            "prompt_eval_duration": int(final.prompt_ms * 1e6),
            "eval_count": final.predicted_tokens,
            "eval_duration": int(final.predicted_ms * 1e6),
        }
    if info.resumed:
        doc["resumed"] = info.resumed  # an extra field (Ollama's clients ignore it): the answer paused
    return doc


async def _respond(request: web.Request, stream: bool, pieces: AsyncGenerator[Piece],
                   piece_doc: PieceDoc, info: RunInfo, final_extra: dict[str, Any] | None = None) -> web.StreamResponse:
    """NDJSON when streaming (an error after the first line is a last `{"error"}` line), else one JSON.
    `final_extra`: more fields for the final object, filled in before the final piece comes.

    Tool calls come whole, in one line of their own before the final one, as Ollama sends them."""
    extra = final_extra if final_extra is not None else {}
    async with contextlib.aclosing(pieces):
        if not stream:
            text, thinking, calls, final = [], [], [], None
            async for piece in pieces:
                if isinstance(piece, Final):
                    final = piece
                elif isinstance(piece, Thinking):
                    thinking.append(piece.text)
                elif isinstance(piece, ToolCalls):
                    calls += _ollama_tool_calls(piece)
                else:
                    text.append(piece)
            return web.json_response(piece_doc("".join(text), "".join(thinking), calls) | _final_fields(final, info) | extra)

        def line(piece: Piece) -> bytes:
            if isinstance(piece, Final):
                doc = piece_doc("", "", []) | _final_fields(piece, info) | extra
            elif isinstance(piece, Thinking):
                doc = piece_doc("", piece.text, [])
            elif isinstance(piece, ToolCalls):
                doc = piece_doc("", "", _ollama_tool_calls(piece))
            else:
                doc = piece_doc(piece, "", [])
            return json.dumps(doc).encode() + b"\n"
        return await stream_items(request, pieces, "application/x-ndjson", line)


def make_routes(dispatcher: Dispatcher, catalog: Catalog, max_body_bytes: int) -> web.RouteTableDef:
    routes = web.RouteTableDef()
    manager = dispatcher.manager
    models = manager.planner.models
    metrics = dispatcher.metrics
    ignored = IgnoredNames("ollama", metrics.count_ignored if metrics is not None else None)

    async def body_of(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
        body = _known_fields(await json_body(request, max_body_bytes), allowed, ignored)
        string_field(body, "model")
        parse_model_name(body["model"])
        return body

    async def generation(request: web.Request, body: dict[str, Any], messages: list[dict[str, Any]] | None,
                         prompt: str | None, piece_doc: PieceDoc,
                         tools: list[dict[str, Any]] | None = None,
                         context: list[int] | None = None) -> web.StreamResponse:
        """`context`: None where no context is asked for or answered (chat, raw), else /api/generate's."""
        model = body["model"]
        options = ollama_options(body.get("options"), ignored)
        keep_alive = keep_alive_seconds(body.get("keep_alive"))
        stream = _stream_flag(body)
        fmt = response_format(body.get("format"))
        think = _think(body.get("think"))
        route = dispatcher.route(model, options.num_ctx)
        if route.target == "pool":
            return await dispatcher.proxy_to_pool(request, route, request.path, body)
        # What Ollama refuses for a model, refused the same way (its template decides).
        capabilities = (await asyncio.to_thread(catalog.card, models.resolve(model))).capabilities
        if tools and "tools" not in capabilities:
            raise BadRequest(f'"{model}" does not support tools')
        if think not in (None, False) and ("thinking" not in capabilities or prompt is not None):
            raise BadRequest(f'"{model}" does not support thinking' + (" with 'raw'" if prompt is not None else ""))
        info = run_info(request, client_of(request))
        if not messages and not prompt:
            reason = await dispatcher.load_only(model, options.num_ctx, keep_alive, info)
            return web.json_response(piece_doc("", "", []) | {"done": True, "done_reason": reason,
                                                      "total_duration": info.total_ns,
                                                      "load_duration": int(info.load_duration_s * 1e9)})
        session = dispatcher.session
        # A structured answer (a grammar from `format`, tool calls) is not resumed: a continuation
        # would start its grammar or parser afresh in the middle of the answer.
        # Nor is one after an earlier context: it is a raw prompt made here, not the messages.
        progress = (Progress() if dispatcher.resume_policy.enabled and fmt is None and not body.get("tools")
                    and not context else None)
        sampling = {k: v for k, v in options.sampling.items() if k != "n_predict"}
        spec = ResumeSpec(sampling, int(options.sampling.get("n_predict", -1)), messages=messages or None,
                          prompt=None if messages else prompt)
        # /api/generate's context: which coordinator answered, and what prompt it was sent when made here.
        context_out: dict[str, Any] | None = {} if context is not None and messages else None
        if messages:
            upstream = {"messages": messages, **options.sampling}
            if "n_predict" in upstream:
                upstream["max_tokens"] = upstream.pop("n_predict")
            if fmt:
                upstream["response_format"] = fmt
            if tools:
                upstream["tools"] = tools
            if think is not None and "thinking" in capabilities:
                upstream |= reasoning_fields(think)

            def open_stream(url: str) -> AsyncGenerator[Piece]:
                if context_out is not None:
                    context_out["url"] = url
                return chat_pieces(session, url, upstream, progress)
            if context_out is not None and context:
                raw_body = dict(options.sampling)
                if fmt:
                    raw_body["json_schema"] = fmt.get("json_schema", {}).get("schema", {})
                turn, earlier, state = messages, context, context_out

                def open_stream(url: str) -> AsyncGenerator[Piece]:
                    state["url"] = url
                    return _after_context(session, url, turn, earlier, raw_body, state)
        else:
            raw = {"prompt": prompt, **options.sampling}
            if fmt:
                raw["json_schema"] = fmt.get("json_schema", {}).get("schema", {})

            def open_stream(url: str) -> AsyncGenerator[Piece]:
                return completion_pieces(session, url, raw, progress)
        resume = None
        if progress is not None:
            def reopen(url: str) -> AsyncGenerator[Piece]:
                if context_out is not None:
                    context_out["url"] = url
                return continuation(session, url, spec, progress)
            resume = Resume(progress, reopen)
        pieces = dispatcher.fleet_stream(model, options.num_ctx, keep_alive, open_stream, info, resume)
        extra: dict[str, Any] = {}
        if context_out is not None and messages:
            pieces = _context_of(session, pieces, messages, context_out, extra)
        return await _respond(request, stream, dispatcher.observed(model, pieces, info), piece_doc, info, extra)

    @routes.post("/api/chat")
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await body_of(request, CHAT_FIELDS)
        tools = _tools(body.get("tools"))
        messages = _messages(body.get("messages"), ignored)
        model = body["model"]

        def piece(text: str, thinking: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            return {"model": model, "created_at": now(), "message": message, "done": False}
        return await generation(request, body, messages, None, piece, tools)

    @routes.post("/api/generate")
    async def generate(request: web.Request) -> web.StreamResponse:
        body = await body_of(request, GENERATE_FIELDS)
        for key, why in (("suffix", "fill-in-the-middle is not served"), ("template", "the model's template is used"),
                         ("images", "this model server takes no images")):
            _unsupported(body, key, why)
        prompt, system, raw = body.get("prompt") or "", body.get("system") or "", body.get("raw") or False
        if not isinstance(prompt, str) or not isinstance(system, str) or not isinstance(raw, bool):
            raise BadRequest("'prompt' and 'system' must be strings, 'raw' true or false")
        model = body["model"]
        messages = None
        if prompt and not raw:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

        context = _context(body.get("context"))

        def piece(text: str, thinking: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
            return {"model": model, "created_at": now(), "response": text, "done": False} | (
                {"thinking": thinking} if thinking else {})
        return await generation(request, body, messages, prompt if raw else None, piece,
                                context=None if raw else (context or []))

    digests = manager.planner.digests

    def digest_of(card: ModelCard) -> str:
        """An Ollama blob's name, else the file's sha256 once the digest thread has it ("" until then)."""
        if card.digest or digests is None:
            return card.digest
        return digests.digest(card.path) or ""

    @routes.get("/api/tags")
    async def tags(request: web.Request) -> web.Response:
        out, seen = [], set()
        listed = models.list()
        if digests is not None:
            # Clients tell models apart by digest (llm-ollama groups by it): give new files a moment.
            await digests.settle([m.path for m in listed], DIGEST_WAIT_S)
        for resolved in listed:
            try:
                card = catalog.card(resolved)
            except (LlamafleetError, OSError):
                # One unreadable file must not hide the others; /api/show names its problem.
                continue
            name = parse_model_name(resolved.name).short
            if name in seen:
                continue
            seen.add(name)
            out.append({"name": name, "model": name, "modified_at": card.modified_at, "size": card.size,
                        "digest": digest_of(card), "details": card.details})
        for name in sorted(dispatcher.pool.models() - seen):
            out.append({"name": name, "model": name, "details": {}})
        return web.json_response({"models": out})

    @routes.get("/api/ps")
    async def ps(request: web.Request) -> web.Response:
        out = []
        for doc in manager.describe():
            resolved = models.resolve(doc["model"])
            card = catalog.card(resolved)
            expires = rfc3339(doc["expires_at_unix"]) if doc["expires_at_unix"] else None
            out.append({"name": doc["model"], "model": doc["model"], "size": doc["size_bytes"],
                        "size_vram": doc["gpu_bytes"], "digest": digest_of(card), "details": card.details,
                        "expires_at": expires, "context_length": doc["ctx"],
                        "state": doc["state"], "backends": doc["backends"]})
        return web.json_response({"models": out})

    @routes.post("/api/show")
    async def show(request: web.Request) -> web.StreamResponse:
        body = await json_body(request, max_body_bytes)
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest("'model' must be a non-empty string")
        try:
            card = catalog.card(models.resolve(name))
        except ModelNotFound:
            route = dispatcher.route(name)
            return await dispatcher.proxy_to_pool(request, route, "/api/show", {"model": name})
        return web.json_response({
            "modelfile": "", "parameters": "", "template": card.template, "license": "",
            "details": card.details, "model_info": card.model_info, "capabilities": card.capabilities,
            "modified_at": card.modified_at, "digest": digest_of(card),
        })

    @routes.get("/api/version")
    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": OLLAMA_API_VERSION, "llamafleet": LLAMAFLEET_VERSION})

    @routes.get("/")
    async def root(request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running (llamafleet)")

    for path in ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs/{digest}"):
        @routes.route("*", path)
        async def not_served(request: web.Request) -> web.Response:
            return error(501, f"{request.path} is not served by llamafleet: models are GGUF files in the "
                              "models directory or an Ollama store the controller reads")
    return routes
