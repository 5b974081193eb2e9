"""The allow-lists and checks between a client's request and llama-server."""

from __future__ import annotations

from typing import Any

import pytest

from llamafleet.common.errors import UsageError
from llamafleet.common.units import parse_duration
from llamafleet.controller.gateway.options import (
    MAX_IGNORED_NAMES,
    OPENAI_CHAT_FIELDS,
    BadRequest,
    IgnoredNames,
    keep_alive_seconds,
    ollama_options,
    openai_body,
    response_format,
)


def test_ollama_options_map_to_llama_server_fields() -> None:
    options = ollama_options({"num_predict": 32, "temperature": 0, "top_k": 20, "top_p": 0.9, "seed": 7,
                              "stop": "\n", "num_keep": 4, "num_ctx": 8192, "num_gpu": 99, "numa": None})
    assert options.sampling == {"n_predict": 32, "temperature": 0.0, "top_k": 20, "top_p": 0.9, "seed": 7,
                                "stop": ["\n"], "n_keep": 4}
    assert options.num_ctx == 8192  # a load-time option, read apart; num_gpu is the fleet's business


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"temperature": float("nan")}, "'temperature' must be a number"),
        ({"num_predict": "8"}, "'num_predict' must be an integer"),
        ({"num_predict": float("inf")}, "'num_predict' must be an integer"),
        ({"num_predict": True}, "'num_predict' must be an integer"),
        ({"num_predict": -3}, "'num_predict' must be between"),
        ({"num_ctx": 0}, "'num_ctx' must be between"),
        ({"num_ctx": 1 << 40}, "'num_ctx' must be between"),
        ({"top_p": 2}, "'top_p' must be between"),
        ({"stop": [1, 2]}, "'stop' must be a string or a list of strings"),
        ({"stop": ["x"] * 17}, "at most 16"),
        ({"mirostat": 3}, "'mirostat' must be between"),
    ],
)
def test_bad_options_are_400_with_the_option_named(options: dict, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        ollama_options(options)


def test_unknown_options_are_dropped_and_reported_never_passed_on() -> None:
    seen: list[tuple[str, str]] = []
    options = ollama_options({"n_discard": 4, "id_slot": 1, "keep_alive": "5m", "draft_num_predict": 3,
                              "rope_frequency_base": 1e4, "temperature": 0}, lambda kind, name: seen.append((kind, name)))
    assert options.sampling == {"temperature": 0.0}
    assert seen == [("option", "n_discard"), ("option", "id_slot"), ("option", "keep_alive"),
                    ("option", "draft_num_predict"), ("option", "rope_frequency_base")]


def test_floats_for_integer_options_are_truncated_as_ollama_does() -> None:
    assert ollama_options({"num_predict": 8.0, "top_k": 40.7, "seed": 3.0}).sampling == {
        "n_predict": 8, "top_k": 40, "seed": 3}
    assert ollama_options({"num_ctx": 2048.0}).num_ctx == 2048


def test_ignored_names_are_logged_once_and_bounded(caplog: pytest.LogCaptureFixture) -> None:
    counted: list[tuple[str, str, str]] = []
    ignored = IgnoredNames("ollama", lambda *labels: counted.append(labels))
    with caplog.at_level("WARNING"):
        for _ in range(3):
            ignored("option", "keep_alive")
        ignored("field", "bad\nname")
        for i in range(MAX_IGNORED_NAMES + 10):
            ignored("field", f"f{i}")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("'keep_alive'" in line for line in lines) == 1  # once per name, however often it comes
    assert counted[:3] == [("ollama", "option", "keep_alive")] * 3
    assert counted[3] == ("ollama", "field", "other")  # not plain text: no label of the client's making
    assert len({name for _, _, name in counted}) <= MAX_IGNORED_NAMES + 1 and counted[-1][2] == "other"
    assert len(lines) <= MAX_IGNORED_NAMES + 1


def test_options_must_be_an_object() -> None:
    with pytest.raises(BadRequest, match="'options' must be an object"):
        ollama_options(["temperature", 0])


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), (0, 0.0), (300, 300.0), (-1, -1.0), ("5m", 300.0), ("1h30m", 5400.0), ("10s", 10.0),
     ("0", 0.0), ("-1", -1.0), ("1.5h", 5400.0), ("250ms", 0.25), ("-5m", -300.0)],
)
def test_keep_alive_reads_ollamas_forms(value: object, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m5", "", True, [], {"s": 1}, "1" * 40, float("inf")])
def test_keep_alive_rejects_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(BadRequest, match="keep_alive"):
        keep_alive_seconds(value)


def test_parse_duration_is_shared_with_the_settings() -> None:
    assert parse_duration("2m30s") == 150.0
    with pytest.raises(UsageError, match="not a duration"):
        parse_duration("2 weeks")


def test_format_becomes_a_response_format() -> None:
    assert response_format(None) is None and response_format("") is None
    assert response_format("json") == {"type": "json_object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert (formatted := response_format(schema)) is not None and formatted["json_schema"]["schema"] == schema
    with pytest.raises(BadRequest):
        response_format("yaml")


def test_openai_bodies_pass_the_allow_list_only() -> None:
    body = {"model": "m", "messages": [], "max_tokens": 5, "user": "u", "metadata": {"a": 1}, "n_discard": 1,
            "id_slot": 0, "cache_prompt": False}
    seen: list[str] = []
    assert openai_body(body, OPENAI_CHAT_FIELDS, lambda kind, name: seen.append(name)) == {
        "model": "m", "messages": [], "max_tokens": 5}
    assert seen == ["n_discard", "id_slot", "cache_prompt"]  # the SDKs' own fields go without a word
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "'n' must be 1"), ({"max_tokens": "5"}, "'max_tokens' must be an integer"),
        ({"stream": "yes"}, "'stream' must be true or false")]
    for bad, message in cases:
        with pytest.raises(BadRequest, match=message):
            openai_body({"model": "m", **bad}, OPENAI_CHAT_FIELDS)
