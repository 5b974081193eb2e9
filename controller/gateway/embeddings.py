"""Embeddings from the fleet: Ollama's `/api/embed` and `/api/embeddings`, OpenAI's `/v1/embeddings`.

Every coordinator serves embeddings beside completions (`--embeddings`; a generative model gets
last-token pooling, an embedding model keeps its own, see coordinator/command.py), so any fleet
model embeds; a model routed to the Ollama pool is proxied there as before.

An input longer than the coordinator can embed is cut to fit when `truncate` is true (Ollama's
default, and what Ollama's OpenAI route does), else it is a 400. Inputs are tokenized by the
coordinator only when they might be too long: a token covers at least one byte, so text shorter
than the limit in bytes always fits.
"""

from __future__ import annotations

import array
import base64
import contextlib
import math
import sys
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from llamafleet.controller.gateway.dispatch import Dispatcher, RunInfo
from llamafleet.controller.gateway.fairness import client_of
from llamafleet.controller.gateway.options import BadRequest, IgnoredNames, keep_alive_seconds, ollama_options
from llamafleet.controller.gateway.upstream import UpstreamRejected, one_answer
from llamafleet.controller.models import parse_model_name
from llamafleet.controller.web import json_body, string_field

EMBED_FIELDS = frozenset({"model", "input", "truncate", "options", "keep_alive", "dimensions"})
LEGACY_FIELDS = frozenset({"model", "prompt", "options", "keep_alive"})
OPENAI_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions"})
OPENAI_SILENT = frozenset({"user"})  # sent by the SDKs; means nothing to one server
# llama-server's physical batch with --embeddings: what a pooling that cannot be split must fit in.
UBATCH_TOKENS = 512
SPECIAL_TOKENS_MARGIN = 4  # BOS/EOS and the like that tokenizing may add to the text's own tokens
MAX_INPUTS = 2048
Input = str | list[int]


@dataclass(frozen=True)
class Embedded:
    vectors: list[Any]  # lists of floats, or base64 strings when asked for
    prompt_tokens: int


def _inputs(value: Any, field: str, tokens_allowed: bool) -> list[Input]:
    """A string, a list of strings (or, for OpenAI, token lists): always a list."""
    items = [value] if isinstance(value, str) else value
    if tokens_allowed and isinstance(items, list) and items and all(_is_token(t) for t in items):
        items = [items]  # one input given as its tokens
    if not isinstance(items, list) or not all(isinstance(i, str) or (tokens_allowed and _is_tokens(i))
                                             for i in items):
        kinds = "a string, a list of strings or token lists" if tokens_allowed else "a string or a list of strings"
        raise BadRequest(f"'{field}' must be {kinds}")
    if len(items) > MAX_INPUTS:
        raise BadRequest(f"'{field}' takes at most {MAX_INPUTS} inputs per request")
    return items


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_tokens(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_token(t) for t in value)


def _dimensions(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest("'dimensions' must be a positive integer")
    return value


def _truncate_flag(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise BadRequest("'truncate' must be true or false")
    return value


def shortened(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` values, normalised again (as Ollama does); the vector as is without."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head))
    return [v / norm for v in head] if norm else head


def make_routes(dispatcher: Dispatcher, max_body_bytes: int) -> web.RouteTableDef:
    routes = web.RouteTableDef()
    metrics = dispatcher.metrics
    count = metrics.count_ignored if metrics is not None else None
    ignored = {"ollama": IgnoredNames("ollama", count), "openai": IgnoredNames("openai", count)}

    async def body_of(request: web.Request, allowed: frozenset[str], api: str,
                      silent: frozenset[str] = frozenset()) -> dict[str, Any]:
        body = await json_body(request, max_body_bytes)
        for key in body:
            if key not in allowed and key not in silent:
                ignored[api]("field", key)
        body = {k: v for k, v in body.items() if k in allowed}
        parse_model_name(string_field(body, "model"))
        return body

    async def embed(model: str, inputs: list[Input], *, truncate: bool, normalize: bool, ctx: int | None,
                    keep_alive: float | None, info: RunInfo) -> Embedded:
        session = dispatcher.session

        async def fit(url: str, text: Input, limit: int) -> Input:
            if isinstance(text, str) and len(text.encode()) + SPECIAL_TOKENS_MARGIN <= limit:
                return text
            tokens: list[int] = text if isinstance(text, list) else []
            if isinstance(text, str):
                async for doc in one_answer(session, f"{url}/tokenize", {"content": text, "add_special": True}):
                    tokens = [int(t) for t in doc.get("tokens") or []]
            if len(tokens) <= limit:
                return text
            if not truncate:
                raise BadRequest(f"the input length ({len(tokens)} tokens) exceeds the context length ({limit} "
                                 "tokens); send truncate: true to cut it")
            return tokens[:limit]

        async def open_stream(url: str) -> AsyncGenerator[Embedded]:
            deployment = dispatcher.manager.find(model)
            spec = deployment.spec if deployment is not None else None
            if spec is None:
                limit = UBATCH_TOKENS
            elif spec.embedding_pooling:
                limit = spec.ctx_per_slot - 1  # split over batches: a slot's context, less one
            else:
                limit = min(spec.ctx_per_slot - 1, UBATCH_TOKENS)  # its own pooling: one batch
            fitted = [await fit(url, text, limit) for text in inputs]
            upstream = {"input": fitted, "embd_normalize": 2 if normalize else -1}
            async for doc in one_answer(session, f"{url}/v1/embeddings", upstream):
                data = sorted(doc.get("data") or [], key=lambda d: d.get("index", 0))
                usage = doc.get("usage") or {}
                yield Embedded([d.get("embedding") for d in data], int(usage.get("prompt_tokens") or 0))

        stream = dispatcher.fleet_stream(model, ctx, keep_alive, open_stream, info)
        async with contextlib.aclosing(stream):
            async for embedded in stream:
                if len(embedded.vectors) != len(inputs):
                    raise UpstreamRejected(502, f"the coordinator returned {len(embedded.vectors)} embeddings "
                                                f"for {len(inputs)} inputs")
                return embedded
        raise UpstreamRejected(502, "the coordinator sent no embeddings")

    async def ollama_embed(request: web.Request, legacy: bool) -> web.StreamResponse:
        body = await body_of(request, LEGACY_FIELDS if legacy else EMBED_FIELDS, "ollama")
        model = body["model"]
        options = ollama_options(body.get("options"), ignored["ollama"])
        keep_alive = keep_alive_seconds(body.get("keep_alive"))
        if legacy:
            prompt = body.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise BadRequest("'prompt' must be a string")
            inputs: list[Input] = [prompt] if prompt else []
        else:
            given = body.get("input")
            # As Ollama: no input, or an empty string, is nothing to embed (a load).
            inputs = _inputs([] if given is None or given == "" else given, "input", False)
        truncate = _truncate_flag(body.get("truncate"))
        dimensions = _dimensions(body.get("dimensions"))
        route = dispatcher.route(model, options.num_ctx)
        if route.target == "pool":
            return await dispatcher.proxy_to_pool(request, route, request.path, body)
        info = RunInfo(client=client_of(request))
        if not inputs:
            # As Ollama: nothing to embed loads the model (or, with keep_alive 0, unloads it).
            await dispatcher.load_only(model, options.num_ctx, keep_alive, info)
            return web.json_response({"embedding": []} if legacy else
                                     {"model": model, "embeddings": [], "total_duration": info.total_ns,
                                      "load_duration": int(info.load_duration_s * 1e9)})
        # Ollama's old route answers the model's raw vector; the new one a normalised one.
        embedded = await embed(model, inputs, truncate=truncate, normalize=not legacy, ctx=options.num_ctx,
                               keep_alive=keep_alive, info=info)
        if legacy:
            return web.json_response({"embedding": embedded.vectors[0]})
        return web.json_response({
            "model": model, "embeddings": [shortened(v, dimensions) for v in embedded.vectors],
            "total_duration": info.total_ns, "load_duration": int(info.load_duration_s * 1e9),
            "prompt_eval_count": embedded.prompt_tokens,
        })

    @routes.post("/api/embed")
    async def api_embed(request: web.Request) -> web.StreamResponse:
        return await ollama_embed(request, legacy=False)

    @routes.post("/api/embeddings")
    async def api_embeddings(request: web.Request) -> web.StreamResponse:
        return await ollama_embed(request, legacy=True)

    @routes.post("/v1/embeddings")
    async def openai_embeddings(request: web.Request) -> web.StreamResponse:
        body = await body_of(request, OPENAI_FIELDS, "openai", OPENAI_SILENT)
        model = body["model"]
        inputs = _inputs(body.get("input"), "input", True)
        if not inputs:
            raise BadRequest("'input' must not be empty")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be \"float\" or \"base64\"")
        dimensions = _dimensions(body.get("dimensions"))
        route = dispatcher.route(model)
        if route.target == "pool":
            return await dispatcher.proxy_to_pool(request, route, request.path, body)
        info = RunInfo(client=client_of(request))
        # Floats from the coordinator, so `dimensions` can shorten them; base64 is made here.
        embedded = await embed(model, inputs, truncate=True, normalize=True, ctx=None, keep_alive=None, info=info)
        vectors = [shortened(v, dimensions) for v in embedded.vectors]
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64(v) if encoding == "base64" else v} for i, v in enumerate(vectors)]
        return web.json_response({"object": "list", "data": data, "model": model,
                                  "usage": {"prompt_tokens": embedded.prompt_tokens,
                                            "total_tokens": embedded.prompt_tokens}})

    return routes


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 values."""
    values = array.array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()
