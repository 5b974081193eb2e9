"""Streaming from a coordinator (`llama-server`): text pieces, then the final counts and timings.

Two llama-server endpoints are read: `/v1/chat/completions` (the model's chat template is
applied there) and `/completion` (raw prompts). Both are asked to stream, also for clients
that asked for one JSON answer: a stream shows a dead backend at once and carries the timings.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from llamafleet.common.errors import LlamafleetError

if TYPE_CHECKING:
    from llamafleet.controller.gateway.resume import Progress

# Connecting to a loopback llama-server is instant; a model's prompt processing is not, so
# there is no read timeout (the client decides how long it waits).
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10)
_STOP_TYPES = {"limit": "length", "eos": "stop", "word": "stop"}
# Asked of llama-server when a generation may have to be resumed (gateway/resume.py), so that the
# id of every token it streams is known; post-sampling probabilities cost no pass over the vocabulary.
CHAT_TRACKING = {"n_probs": 1, "post_sampling_probs": True, "timings_per_token": True}
COMPLETION_TRACKING = {"return_tokens": True, "timings_per_token": True}


class UpstreamUnavailable(LlamafleetError):
    """The coordinator could not be reached or dropped the connection (it probably died)."""


class UpstreamGarbage(LlamafleetError):
    """llama-server sent something that is not the protocol (a malformed line, a wrong type)."""


class UpstreamRejected(LlamafleetError):
    """llama-server answered with an error status; `status` is it, the message is its text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Final:
    done_reason: str  # stop, length
    prompt_tokens: int
    prompt_ms: float
    predicted_tokens: int
    predicted_ms: float


async def _error_text(response: aiohttp.ClientResponse) -> str:
    raw = await response.read()
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        # Not JSON: show the start of whatever it was.
        return raw[:300].decode(errors="replace") or response.reason or "error"
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or doc)


async def sse_events(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
    """POST `body` and yield each `data:` JSON object of the event stream until `[DONE]` or the end."""
    try:
        async with session.post(url, json=body, timeout=UPSTREAM_TIMEOUT) as response:
            if response.status != 200:
                raise UpstreamRejected(response.status, await _error_text(response))
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    if line.startswith(b"error:"):
                        raise UpstreamRejected(500, line[6:].decode(errors="replace").strip())
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    event = json.loads(data)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise UpstreamGarbage("the coordinator sent a malformed event") from None
                if not isinstance(event, dict):
                    raise UpstreamGarbage("the coordinator sent an event that is not a JSON object")
                if "error" in event:
                    error = event["error"]
                    raise UpstreamRejected(500, str(error.get("message") if isinstance(error, dict) else error))
                yield event
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        # Refused, reset, or cut mid-stream: the coordinator is gone or going.
        raise UpstreamUnavailable(f"coordinator connection failed: {exc or type(exc).__name__}") from None
    # The body ended without llama-server's `[DONE]`: cut short, never a finished answer.
    raise UpstreamUnavailable("the coordinator's stream ended before its end marker")


async def one_answer(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
    """POST `body` for one JSON answer (no stream), yielded once."""
    try:
        async with session.post(url, json=body, timeout=UPSTREAM_TIMEOUT) as response:
            if response.status != 200:
                raise UpstreamRejected(response.status, await _error_text(response))
            doc = await response.json(content_type=None)
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        # Refused or reset: the coordinator is gone or going.
        raise UpstreamUnavailable(f"coordinator connection failed: {exc or type(exc).__name__}") from None
    except ValueError:  # not JSON at all
        raise UpstreamGarbage("the coordinator answered with something that is not JSON") from None
    if not isinstance(doc, dict):
        raise UpstreamGarbage("the coordinator answered with something that is not a JSON object")
    yield doc


@dataclass(frozen=True)
class Thinking:
    """A piece of the model's reasoning (llama-server's `reasoning_content`), apart from its answer."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it


@dataclass(frozen=True)
class ToolCalls:
    """The answer's tool calls, whole: llama-server streams each call's arguments in fragments."""

    calls: tuple[ToolCall, ...]


Piece = str | Thinking | ToolCalls | Final


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _merge_tool_call_deltas(calls: dict[int, dict[str, str]], deltas: list[dict[str, Any]]) -> None:
    for delta in deltas:
        call = calls.setdefault(int(delta.get("index", len(calls))), {"id": "", "name": "", "arguments": ""})
        function = delta.get("function") or {}
        call["id"] = delta.get("id") or call["id"]
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""


def _final(timings: dict[str, Any], prompt_tokens: int | None, predicted: int | None, done_reason: str) -> Final:
    try:
        return Final(
            done_reason=done_reason,
            prompt_tokens=int(prompt_tokens if prompt_tokens is not None else timings.get("prompt_n", 0)),
            prompt_ms=float(timings.get("prompt_ms", 0.0)),
            predicted_tokens=int(predicted if predicted is not None else timings.get("predicted_n", 0)),
            predicted_ms=float(timings.get("predicted_ms", 0.0)),
        )
    except (TypeError, ValueError):
        raise UpstreamGarbage("the coordinator sent counts or timings that are not numbers") from None


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UpstreamGarbage(f"the coordinator sent '{what}' that is not a string")
    return value


def checked_openai(doc: dict[str, Any], *, chunk: bool) -> dict[str, Any]:
    """An OpenAI-style answer or stream chunk from llama-server, checked where clients read it:
    passed on as it is, it would reach the client as a wrong-typed "success" (the official
    openai client does not validate), so a wrong type is garbage here."""
    choices = doc.get("choices")
    if choices is None and chunk:
        choices = []
    if not isinstance(choices, list):
        raise UpstreamGarbage("the coordinator sent 'choices' that are not a list")
    for choice in choices:
        choice = _dict(choice, "choice")
        _text(choice.get("finish_reason"), "finish_reason")
        if "text" in choice:  # /v1/completions
            _text(choice["text"], "text")
            continue
        part = _dict(choice.get("delta" if chunk else "message"), "delta" if chunk else "message")
        for key in ("content", "reasoning_content", "role"):
            _text(part.get(key), key)
        calls = part.get("tool_calls")
        if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            raise UpstreamGarbage("the coordinator sent 'tool_calls' that are not a list of objects")
    _dict(doc.get("usage"), "usage")
    return doc


def _dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UpstreamGarbage(f"the coordinator sent a {what} that is not a JSON object")
    return value


def chat_event_token(event: dict[str, Any], progress: Progress) -> str:
    """Record an OpenAI-style event (/v1/chat/completions, /v1/completions) in `progress`; the text
    the client has not seen yet."""
    choices = event.get("choices") or []
    if not isinstance(choices, list):
        raise UpstreamGarbage("the coordinator sent 'choices' that are not a list")
    content, token_id = "", None
    for choice in choices:
        choice = _dict(choice, "choice")
        delta = _dict(choice.get("delta"), "delta")
        if delta.get("content"):
            content += str(delta["content"])
        if isinstance(choice.get("text"), str):  # /v1/completions
            content += choice["text"]
        if any(delta.get(key) for key in ("reasoning_content", "tool_calls")):
            progress.plain = False
        logprobs = _dict(choice.get("logprobs"), "logprobs").get("content") or []
        if isinstance(logprobs, list) and logprobs and isinstance(logprobs[-1], dict):
            token_id = logprobs[-1].get("id")
    timings = _dict(event.get("timings"), "timings")
    if "usage" in event or not (content or timings):
        return ""  # the role announcement, the finish reason, the counts: no token
    progress.timings(timings)
    decoded = timings.get("predicted_n")
    return progress.token(decoded if isinstance(decoded, int) else None,
                          token_id if isinstance(token_id, int) else None, content)


async def chat_pieces(session: aiohttp.ClientSession, base: str, body: dict[str, Any],
                      progress: Progress | None = None) -> AsyncGenerator[Piece]:
    """Stream `/v1/chat/completions`: content and Thinking pieces, the ToolCalls if any, then one
    Final. With `progress`, every token's id is asked for and recorded, so that the answer can be
    resumed elsewhere (gateway/resume.py)."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    if progress is not None:
        body |= CHAT_TRACKING
    reason = "stop"
    tool_calls: dict[int, dict[str, str]] = {}
    async for event in sse_events(session, f"{base}/v1/chat/completions", body):
        checked_openai(event, chunk=True)
        if progress is not None and (text := chat_event_token(event, progress)):
            yield text
        for choice in event.get("choices") or []:
            choice = _dict(choice, "choice")
            delta = _dict(choice.get("delta"), "delta")
            if delta.get("reasoning_content"):
                yield Thinking(delta["reasoning_content"])
            if progress is None and (content := delta.get("content")):
                yield str(content)
            _merge_tool_call_deltas(tool_calls, delta.get("tool_calls") or [])
            if choice.get("finish_reason"):
                reason = "length" if choice["finish_reason"] == "length" else "stop"
        if "usage" in event:  # the last event (include_usage is always asked for)
            calls = [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(tool_calls.items())]
            if reason == "length":
                # Cut off by the token limit in the middle of a call: like Ollama, only whole calls.
                calls = [call for call in calls if _is_json(call.arguments)]
            if calls:
                yield ToolCalls(tuple(calls))
            usage = _dict(event.get("usage"), "usage")
            final = _final(_dict(event.get("timings"), "timings"), usage.get("prompt_tokens"),
                           usage.get("completion_tokens"), reason)
            yield progress.final(final) if progress is not None else final
            return
    raise UpstreamUnavailable("coordinator ended the stream without its final counts")


async def completion_pieces(session: aiohttp.ClientSession, base: str, body: dict[str, Any],
                            progress: Progress | None = None) -> AsyncGenerator[str | Final]:
    """Stream llama-server's native `/completion` (a raw prompt): content pieces, then one Final.
    With `progress`, every token's id is asked for and recorded (see gateway/resume.py)."""
    body = body | {"stream": True}
    if progress is not None:
        body |= COMPLETION_TRACKING
    async for event in sse_events(session, f"{base}/completion", body):
        content = event.get("content") or ""
        if not isinstance(content, str):
            raise UpstreamGarbage("the coordinator sent 'content' that is not a string")
        if event.get("stop"):
            timings = _dict(event.get("timings"), "timings")
            final = _final(timings, event.get("tokens_evaluated"), event.get("tokens_predicted"),
                           _STOP_TYPES.get(str(event.get("stop_type")), "stop"))
            if content:
                yield content
            yield progress.final(final) if progress is not None else final
            return
        if progress is None:
            if content:
                yield content
            continue
        progress.timings(_dict(event.get("timings"), "timings"))
        if progress.prompt_tokens is None and isinstance(event.get("tokens_evaluated"), int):
            progress.prompt_tokens = event["tokens_evaluated"]
        tokens = event.get("tokens")
        decoded = event.get("tokens_predicted")
        token_id = tokens[0] if isinstance(tokens, list) and len(tokens) == 1 else None
        text = progress.token(decoded if isinstance(decoded, int) else None,
                              token_id if isinstance(token_id, int) else None, content)
        if text:
            yield text
    raise UpstreamUnavailable("coordinator ended the stream without its final counts")
