"""What a request may ask of llama-server: explicit allow-lists, checked types, clear 400s.

Nothing a client sends reaches llama-server unless it is named here: llama-server accepts
fields that change how the server behaves for everyone (`n_discard`, `id_slot`, `lora`,
`cache_prompt`…), and the gateway decides those, not the caller.

As lenient as Ollama about what it does not use: an unknown field or option is dropped (never
passed on), logged once per name and counted (`IgnoredNames`); Ollama's coercions are made
(a float where an integer goes is truncated, as Go's decoding of `options` does). A field we do
use with a wrong type is still a 400 that names it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llamafleet.common.errors import UsageError
from llamafleet.common.units import parse_duration

log = logging.getLogger(__name__)
MAX_CTX = 1 << 24
MAX_STOP_WORDS = 16
# Names a client invents are unbounded: the log and the metric's labels take this many, then "other".
MAX_IGNORED_NAMES = 256
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
Ignore = Callable[[str, str], None]  # (kind: "field" | "option" | "message field", name)


class BadRequest(UsageError):
    """The request's body is wrong: the gateway answers 400 with this message."""


class IgnoredNames:
    """What requests carried that the gateway does not use: each name logged once, all counted.

    `count(api, kind, name)` feeds `/metrics`; a name that is not plain text, or one past the
    first MAX_IGNORED_NAMES, is logged and counted as "other" so a client cannot grow either.
    """

    def __init__(self, api: str, count: Callable[[str, str, str], None] | None = None) -> None:
        self.api = api
        self._count = count
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, kind: str, name: str) -> None:
        shown = name if _PLAIN_NAME.match(name) else "other"
        if (kind, shown) not in self._seen and len(self._seen) >= MAX_IGNORED_NAMES:
            shown = "other"
        if (kind, shown) not in self._seen:
            self._seen.add((kind, shown))
            log.warning("%s requests: dropping %s '%s', which this gateway does not use (never passed on; "
                        "logged once per name, counted in llamafleet_ignored_fields_total)", self.api, kind, shown)
        if self._count is not None:
            self._count(self.api, kind, shown)


def ignore_silently(kind: str, name: str) -> None:
    """For callers with no log or metric of their own (tests, the CLI's checks)."""


def _int(name: str, low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, float) and math.isfinite(value):
            value = int(value)  # as Ollama: 8.0 (or 8.5) for an integer option is 8
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"option '{name}' must be an integer, not {type(value).__name__}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadRequest(f"option '{name}' must be between {low} and {high}, not {value}")
        return value
    return check


def _float(name: str, low: float | None = None, high: float | None = None) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise BadRequest(f"option '{name}' must be a number, not {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadRequest(f"option '{name}' must be between {low} and {high}, not {value}")
        return float(value)
    return check


def stop_words(name: str) -> Callable[[Any], list[str]]:
    def check(value: Any) -> list[str]:
        words = [value] if isinstance(value, str) else value
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise BadRequest(f"option '{name}' must be a string or a list of strings")
        if len(words) > MAX_STOP_WORDS:
            raise BadRequest(f"option '{name}' takes at most {MAX_STOP_WORDS} strings")
        return words
    return check


@dataclass(frozen=True)
class Option:
    target: str  # llama-server's field
    check: Callable[[Any], Any]


# Ollama `options` → llama-server sampling fields.
OLLAMA_SAMPLING: dict[str, Option] = {
    "num_predict": Option("n_predict", _int("num_predict", -2, 1 << 20)),
    "temperature": Option("temperature", _float("temperature", 0, 100)),
    "top_k": Option("top_k", _int("top_k", 0, 1 << 20)),
    "top_p": Option("top_p", _float("top_p", 0, 1)),
    "min_p": Option("min_p", _float("min_p", 0, 1)),
    "typical_p": Option("typical_p", _float("typical_p", 0, 1)),
    "seed": Option("seed", _int("seed", -1, (1 << 32) - 1)),
    "stop": Option("stop", stop_words("stop")),
    "repeat_penalty": Option("repeat_penalty", _float("repeat_penalty", 0, 100)),
    "repeat_last_n": Option("repeat_last_n", _int("repeat_last_n", -1, MAX_CTX)),
    "presence_penalty": Option("presence_penalty", _float("presence_penalty", -100, 100)),
    "frequency_penalty": Option("frequency_penalty", _float("frequency_penalty", -100, 100)),
    "mirostat": Option("mirostat", _int("mirostat", 0, 2)),
    "mirostat_tau": Option("mirostat_tau", _float("mirostat_tau", 0, 100)),
    "mirostat_eta": Option("mirostat_eta", _float("mirostat_eta", 0, 100)),
    "num_keep": Option("n_keep", _int("num_keep", -1, MAX_CTX)),
}
# Ollama options that choose how a model is loaded on one machine. The fleet decides those
# (placement, threads, batch), so they are accepted and have no effect; `num_ctx` is read apart.
OLLAMA_LOAD_OPTIONS = frozenset({
    "numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only", "use_mmap", "use_mlock",
    "num_thread", "embedding_only", "logits_all", "f16_kv", "penalize_newline", "tfs_z",
})
CHECK_NUM_CTX = _int("num_ctx", 1, MAX_CTX)


@dataclass(frozen=True)
class OllamaOptions:
    sampling: dict[str, Any]  # llama-server fields
    num_ctx: int | None


def ollama_options(raw: Any, ignore: Ignore = ignore_silently) -> OllamaOptions:
    """Ollama's `options` as llama-server fields; options we do not know are dropped (`ignore`)."""
    if raw is None:
        return OllamaOptions({}, None)
    if not isinstance(raw, dict):
        raise BadRequest("'options' must be an object")
    sampling: dict[str, Any] = {}
    num_ctx = None
    for key, value in raw.items():
        if value is None:
            continue  # the official client sends unset options as null
        if key == "num_ctx":
            num_ctx = CHECK_NUM_CTX(value)
        elif key in OLLAMA_SAMPLING:
            option = OLLAMA_SAMPLING[key]
            sampling[option.target] = option.check(value)
        elif key not in OLLAMA_LOAD_OPTIONS:
            ignore("option", str(key))
    return OllamaOptions(sampling, num_ctx)


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's `keep_alive`: seconds, or a duration ("5m", "1h30m", "0", "-1"). None: the default; negative: forever."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("'keep_alive' must be a number of seconds or a duration like \"5m\"")
    try:
        return parse_duration(value)
    except UsageError as exc:
        raise BadRequest(f"'keep_alive': {exc.message}") from None


def response_format(value: Any) -> dict[str, Any] | None:
    """Ollama's `format` ("json" or a JSON schema) as an OpenAI `response_format`."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise BadRequest("'format' must be \"json\" or a JSON schema object")


# OpenAI request fields passed to llama-server as they are (llama-server validates values).
OPENAI_CHAT_FIELDS = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "stream",
    "stream_options", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
    "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
    # Read as Ollama's `think` (openai_think), never passed on as they are.
    "reasoning_effort", "reasoning",
    # llama.cpp's sampling extensions that affect only this request.
    "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
})
OPENAI_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "echo", "suffix",
    "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
})
# Fields OpenAI's SDKs send that mean nothing to one server: dropped without complaint.
OPENAI_IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "prediction", "modalities",
                                   "verbosity", "prompt_cache_key", "safety_identifier"})


THINK_LEVELS = ("high", "medium", "low")


def reasoning_fields(think: bool | str) -> dict[str, Any]:
    """Ollama's `think` as llama-server's per-request reasoning switches (its template kwargs)."""
    if think is False:
        # llama-server: enable_thinking = false. Its reasoning parser stays on otherwise, and with a
        # `format` it lets the grammar wait for a reasoning block that never comes: the answer is
        # unconstrained text filed as reasoning, content "". Off, as Ollama's think false has no parser.
        return {"reasoning_effort": "none", "reasoning_format": "none"}
    fields: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": True}}
    if isinstance(think, str):
        fields["reasoning_effort"] = think  # given to the template, e.g. gpt-oss's
    return fields


def openai_think(body: Mapping[str, Any]) -> bool | str | None:
    """OpenAI's `reasoning_effort` (or `reasoning: {effort}`) read as Ollama's /v1 reads it: as `think`.

    "low", "medium", "high" think at that effort, "none" is `think: false`; absent is None (the
    template's default). Anything else is a 400 with Ollama's words.
    """
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise BadRequest("'reasoning' must be an object")
    effort = reasoning.get("effort") if reasoning is not None else body.get("reasoning_effort")
    if effort is None or effort == "":
        return None
    if effort not in (*THINK_LEVELS, "none"):
        shown = effort if isinstance(effort, str) else json.dumps(effort)
        raise BadRequest(f"invalid reasoning value: '{shown[:40]}' (must be \"high\", \"medium\", \"low\", or \"none\")")
    return False if effort == "none" else str(effort)


def is_known_option(name: str) -> bool:
    return name == "num_ctx" or name in OLLAMA_SAMPLING or name in OLLAMA_LOAD_OPTIONS


def openai_body(body: Mapping[str, Any], allowed: frozenset[str], ignore: Ignore = ignore_silently) -> dict[str, Any]:
    """The allowed fields of an OpenAI body; the SDKs' bookkeeping fields dropped, others too (`ignore`)."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key in allowed:
            out[key] = value
        elif key not in OPENAI_IGNORED_FIELDS:
            ignore("field", key)
    n = out.get("n", 1)
    if n not in (1, None):
        raise BadRequest("'n' must be 1: one completion per request")
    for key in ("max_tokens", "max_completion_tokens", "seed", "top_k"):
        if key in out and out[key] is not None and (not isinstance(out[key], int) or isinstance(out[key], bool)):
            raise BadRequest(f"'{key}' must be an integer")
    if "stream" in out and not isinstance(out["stream"], bool):
        raise BadRequest("'stream' must be true or false")
    return out
