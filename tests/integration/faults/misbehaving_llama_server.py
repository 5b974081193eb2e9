"""A llama-server that misbehaves on purpose: run by the controller in place of the real one.

The misbehaviour is the point, so this is a fake: the real llama-server never sends a list where
an event belongs. The controller starts it like llama-server (`--host`, `--port`, the rest
ignored); `GET /health` answers 200 at once. What each generation does is picked by the request:
`MODE=<name>` anywhere in its prompt or messages (see MODES); every mode sends one good piece
first, so a stream has begun when things go wrong, and a one-JSON answer is wrong as a whole.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Any

from aiohttp import web

MODES = ("ok", "malformed", "list", "wrong_type", "bad_utf8", "cut", "close", "hang")
_MODE = re.compile(r"MODE=(\w+)")
TIMINGS = {"prompt_n": 3, "prompt_ms": 1.0, "predicted_n": 2, "predicted_ms": 2.0}


def _mode(body: dict[str, Any]) -> str:
    found = _MODE.search(json.dumps(body))
    return found.group(1) if found else "ok"


def _event(doc: Any) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


class Shapes:
    """The good pieces of one endpoint, and its wrong-typed one."""

    def __init__(self, path: str) -> None:
        self.path = path

    def piece(self, text: str) -> dict[str, Any]:
        if self.path == "/completion":
            return {"content": text, "stop": False}
        if self.path == "/v1/completions":
            return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake",
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}

    def wrong_type(self) -> dict[str, Any]:
        if self.path == "/completion":
            return {"content": 7, "stop": False}
        if self.path == "/v1/completions":
            return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake",
                    "choices": [{"index": 0, "text": 7, "finish_reason": None}]}
        return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "fake",
                "choices": [{"index": 0, "delta": {"content": 7}, "finish_reason": None}]}

    def ending(self) -> list[bytes]:
        """What ends a good stream: the final piece (with the counts), and [DONE] where llama-server sends it."""
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if self.path == "/completion":
            return [_event({"content": "", "stop": True, "stop_type": "limit", "tokens_evaluated": 3,
                            "tokens_predicted": 2, "timings": TIMINGS})]
        if self.path == "/v1/completions":
            end = self.piece("")
            end["choices"][0]["finish_reason"] = "length"
            return [_event(end), _event(end | {"choices": [], "usage": usage, "timings": TIMINGS}), b"data: [DONE]\n\n"]
        end = self.piece("")
        end["choices"][0] = {"index": 0, "delta": {}, "finish_reason": "length"}
        return [_event(end), _event(end | {"choices": [], "usage": usage, "timings": TIMINGS}), b"data: [DONE]\n\n"]

    def whole(self, text: str) -> dict[str, Any]:
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        if self.path == "/completion":
            return {"content": text, "stop": True, "stop_type": "limit", "tokens_evaluated": 3,
                    "tokens_predicted": 2, "timings": TIMINGS}
        if self.path == "/v1/completions":
            return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "fake", "usage": usage,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}]}
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "fake", "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}]}


async def _stream(request: web.Request, shapes: Shapes, mode: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(_event(shapes.piece("Hello")))
    if mode == "ok":
        await response.write(_event(shapes.piece(" there")))
        for line in shapes.ending():
            await response.write(line)
    elif mode == "malformed":
        await response.write(b'data: {"content": " there"\n\n')
    elif mode == "list":
        await response.write(b"data: [1, 2]\n\n")
    elif mode == "wrong_type":
        await response.write(_event(shapes.wrong_type()))
    elif mode == "bad_utf8":
        await response.write(b"data: " + json.dumps(shapes.piece("@@")).encode().replace(b"@@", b"\xff\xfe") + b"\n\n")
    elif mode == "close":
        assert request.transport is not None
        request.transport.close()  # mid-body: no chunked terminator
        return response
    elif mode == "hang":
        await asyncio.sleep(3600)
    # "cut" (and every garbage mode after its line): the body ends, properly, before the end.
    await response.write_eof()
    return response


async def _whole(request: web.Request, shapes: Shapes, mode: str) -> web.StreamResponse:
    good = json.dumps(shapes.whole("Hello there")).encode()
    if mode == "ok":
        return web.Response(body=good, content_type="application/json")
    if mode == "malformed":
        return web.Response(body=good[:-5], content_type="application/json")
    if mode == "list":
        return web.Response(body=b"[1, 2]", content_type="application/json")
    if mode == "wrong_type":
        doc = shapes.whole("Hello there")
        return web.json_response(doc | ({"content": 7} if shapes.path == "/completion" else {"choices": "Hello"}))
    if mode == "bad_utf8":
        return web.Response(body=good.replace(b"Hello", b"\xff\xfe"), content_type="application/json")
    if mode == "hang":
        await asyncio.sleep(3600)
    # "cut" and "close": the promised body is not all there.
    response = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(good))})
    await response.prepare(request)
    await response.write(good[:len(good) // 2])
    assert request.transport is not None
    request.transport.close()
    return response


async def generate(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    mode = _mode(body)
    if mode not in MODES:
        return web.json_response({"error": {"message": f"no mode {mode}"}}, status=400)
    shapes = Shapes(request.path)
    return await (_stream if body.get("stream") else _whole)(request, shapes, mode)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def tokenize(request: web.Request) -> web.Response:
    return web.json_response({"tokens": [1, 2, 3]})


async def detokenize(request: web.Request) -> web.Response:
    return web.json_response({"content": "Hello"})


async def apply_template(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"prompt": json.dumps(body.get("messages"))})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--version", action="store_true")
    args, _ = parser.parse_known_args()
    if args.version:
        print("version: 0 (misbehaving fake)")
        return
    app = web.Application()
    app.router.add_get("/health", health)
    for path in ("/completion", "/v1/chat/completions", "/v1/completions"):
        app.router.add_post(path, generate)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_post("/apply-template", apply_template)
    print(f"main: server is listening on http://{args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
