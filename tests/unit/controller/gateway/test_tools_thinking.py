"""Ollama's tools and thinking, translated to and from llama-server's OpenAI-style chat."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from unittest import mock

import pytest

from llamafleet.controller.gateway import upstream
from llamafleet.controller.gateway.ollama import (
    _messages,
    _ollama_tool_calls,
    _think,
    _tools,
)
from llamafleet.controller.gateway.options import BadRequest, openai_think, reasoning_fields
from llamafleet.controller.gateway.upstream import Final, Thinking, ToolCall, ToolCalls, UpstreamRejected

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER: dict[str, Any] = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY}}


def test_a_conversation_with_calls_and_results_becomes_openai_messages() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "thinking": "I should look it up.",
         "tool_calls": [{"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C", "tool_name": "get_weather", "tool_call_id": "call_1"},
    ]
    user, assistant, tool = _messages(history)
    assert user == {"role": "user", "content": "Weather in Paris?"}
    # OpenAI's shape: arguments are JSON text, the call is typed, the earlier reasoning kept apart.
    assert assistant["tool_calls"] == [{"type": "function", "id": "call_1",
                                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    assert assistant["reasoning_content"] == "I should look it up."
    assert tool == {"role": "tool", "content": "18 C", "name": "get_weather", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"role": "assistant", "tool_calls": {"name": "f"}}, "messages[0].tool_calls must be a list"),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]},
         "messages[0].tool_calls[0].function.name must be a non-empty string"),
        ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
         "messages[0].tool_calls[0].function.arguments must be an object"),
        ({"role": "user", "tool_calls": [{"function": {"name": "f"}}]}, "only an assistant message makes calls"),
        ({"role": "tool", "content": "x", "tool_name": 3}, "messages[0].tool_name must be a string"),
    ],
)
def test_malformed_calls_are_a_400_naming_the_field(message: dict[str, Any], error: str) -> None:
    with pytest.raises(BadRequest, match=error.replace("[", r"\[").replace("]", r"\]")):
        _messages([message])


def test_tools_are_rebuilt_from_their_function_fields_only() -> None:
    sneaky = {**WEATHER, "function": {**WEATHER["function"], "grammar": "root ::= x"}, "cache_prompt": False}
    assert _tools([sneaky]) == [WEATHER]
    assert _tools([{"type": "function", "function": {"name": "now"}}]) == [
        {"type": "function", "function": {"name": "now", "description": "",
                                          "parameters": {"type": "object", "properties": {}}}}]
    for bad, error in (("f", "'tools' must be a list"), ([{"type": "code"}], "tools[0] must be"),
                       ([{"function": {"name": ""}}], "tools[0].function.name")):
        with pytest.raises(BadRequest, match=error.replace("[", r"\[").replace("]", r"\]")):
            _tools(bad)


def test_think_values_map_to_llama_servers_reasoning_switches() -> None:
    assert reasoning_fields(True) == {"chat_template_kwargs": {"enable_thinking": True}}
    assert reasoning_fields(False) == {"reasoning_effort": "none", "reasoning_format": "none"}
    assert reasoning_fields("low") == {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": "low"}
    assert _think(None) is None and _think("high") == "high"
    with pytest.raises(BadRequest, match='invalid think value: "max"'):
        _think("max")


def test_openai_reasoning_effort_is_read_as_ollamas_v1_reads_it() -> None:
    assert openai_think({}) is None and openai_think({"reasoning_effort": None}) is None
    assert openai_think({"reasoning_effort": "low"}) == "low" and openai_think({"reasoning_effort": "none"}) is False
    # The Responses-style object wins, as in Ollama.
    assert openai_think({"reasoning": {"effort": "high"}, "reasoning_effort": "none"}) == "high"
    for bad in ({"reasoning_effort": "minimal"}, {"reasoning_effort": 3}, {"reasoning": {"effort": "max"}}):
        with pytest.raises(BadRequest, match='invalid reasoning value: .* "low", or "none"'):
            openai_think(bad)
    with pytest.raises(BadRequest, match="'reasoning' must be an object"):
        openai_think({"reasoning": "high"})


def test_llama_server_calls_become_ollama_calls_with_object_arguments() -> None:
    calls = ToolCalls((ToolCall("c1", "get_weather", '{"city": "Paris"}'), ToolCall("", "now", "")))
    assert _ollama_tool_calls(calls) == [
        {"id": "c1", "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}},
        {"function": {"index": 1, "name": "now", "arguments": {}}}]
    with pytest.raises(UpstreamRejected, match="not a JSON object"):
        _ollama_tool_calls(ToolCalls((ToolCall("c", "f", '{"city": '),)))


def test_streamed_call_fragments_and_reasoning_come_out_whole_and_apart() -> None:
    events: list[dict[str, Any]] = [
        {"choices": [{"delta": {"reasoning_content": "Look it "}}]},
        {"choices": [{"delta": {"reasoning_content": "up."}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                                "function": {"name": "get_weather", "arguments": "{\"ci"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "ty\": \"Paris\"}"}}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "now"}}]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}, "timings": {}},
    ]

    async def fake_events(session: Any, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        for event in events:
            yield json.loads(json.dumps(event))

    async def collect() -> list[Any]:
        with mock.patch.object(upstream, "sse_events", fake_events):
            return [piece async for piece in upstream.chat_pieces(mock.Mock(), "http://x", {})]

    pieces = asyncio.run(collect())
    assert pieces[:2] == [Thinking("Look it "), Thinking("up.")]
    assert pieces[2] == ToolCalls((ToolCall("c1", "get_weather", '{"city": "Paris"}'), ToolCall("c2", "now", "")))
    assert isinstance(pieces[3], Final) and pieces[3].predicted_tokens == 9 and len(pieces) == 4
    # The token limit cut the second call short: only the whole one is sent, as Ollama does.
    events[4]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] = '{"tz": "'
    events[5]["choices"][0]["finish_reason"] = "length"
    pieces = asyncio.run(collect())
    assert pieces[2] == ToolCalls((ToolCall("c1", "get_weather", '{"city": "Paris"}'),))
    assert isinstance(pieces[3], Final) and pieces[3].done_reason == "length"
