"""Tools, thinking and structured output through the gateway, with the clients people use.

The model is gemma-3-270m's weights with a tool- and thinking-aware template written into the
GGUF (tests/fixtures/chat_template_gguf.py): llama-server analyses that template and parses the
model's calls and reasoning with the same code it uses for real models. Beside it, the plain
test GGUF (no template) is the model Ollama would refuse tools and thinking for (never loaded).

Every client of issue 18 drives this one fleet through what it offers: the official `ollama`
and `openai` packages, langchain-ollama, litellm and llm-ollama in Python, and ollama-js and
openai-node in a node script (tests/fixtures/js_clients). The tests that unload come last.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ollama
import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletionMessageParam

from llamafleet.common.llamacpp.install import Manifest
from tests.fixtures.chat_template_gguf import TOOLS_AND_THINKING_TEMPLATE, with_chat_template
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0, "seed": 42, "num_predict": 48}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY_QUESTION = [{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}]
JS_CLIENTS = Path(__file__).parents[2] / "fixtures" / "js_clients"


class City(pydantic.BaseModel):
    # Short strings, so a tiny model's answer closes its JSON within the token budget.
    city: str = pydantic.Field(max_length=16)
    country: str = pydantic.Field(max_length=16)


CITY_SCHEMA = City.model_json_schema()


def get_weather(city: str) -> str:
    """Get the current weather of a city.

    Args:
        city: The city's name
    """
    return f"18 C and sunny in {city}"


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city's name"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("tools")
    model = with_chat_template(test_model, root / "tools-template.gguf", TOOLS_AND_THINKING_TEMPLATE)
    with running_fleet(root / "fleet", llama_cpp, model, agents=2, memory_limit="400MiB",
                       model_names=("toolgemma",)) as running:
        (running.models_dir / "gemma.gguf").symlink_to(test_model)
        yield running


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> ollama.Client:
    return ollama.Client(host=fleet.url)


def test_show_says_what_each_template_can_do(client: ollama.Client) -> None:
    assert client.show("toolgemma").capabilities == ["completion", "tools", "thinking"]
    # No template: gemma's built-in one, applied without jinja, takes no tools and does not think.
    assert client.show("gemma").capabilities == ["completion"]


def test_ollama_client_gets_a_call_with_object_arguments_and_sends_the_result_back(client: ollama.Client) -> None:
    answer = client.chat(model="toolgemma", messages=QUESTION, tools=[get_weather], options=GREEDY, think=False)
    # The model copies the template's example call, often more than once before the token limit.
    call = next(iter(answer.message.tool_calls or ()), None)
    assert call is not None and call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    assert call.function.arguments["city"]
    result = get_weather(**call.function.arguments)
    # The call and its result in the history: rendered by the template, answered by the model.
    history: list[Mapping[str, Any] | ollama.Message] = [
        *QUESTION, answer.message, {"role": "tool", "content": result, "tool_name": "get_weather",
                                    "tool_call_id": getattr(call, "id", None) or ""}]
    follow_up = client.chat(model="toolgemma", messages=history, tools=[get_weather], options=GREEDY, think=False)
    assert follow_up.done and (follow_up.message.content or follow_up.message.tool_calls)


def test_streamed_tool_calls_come_whole_in_one_chunk(client: ollama.Client) -> None:
    chunks = list(client.chat(model="toolgemma", messages=QUESTION, tools=[WEATHER_TOOL], options=GREEDY,
                              stream=True))
    with_calls = [c for c in chunks if c.message.tool_calls]
    assert len(with_calls) == 1 and not with_calls[0].done and chunks[-1].done
    call = next(iter(with_calls[0].message.tool_calls or ()), None)
    assert call is not None and call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_thinking_comes_apart_from_the_answer_and_think_false_turns_it_off(client: ollama.Client) -> None:
    thought = client.chat(model="toolgemma", messages=[{"role": "user", "content": "Hi"}], options=GREEDY, think=True)
    assert thought.message.thinking and "<think>" not in (thought.message.content or "")
    streamed = list(client.chat(model="toolgemma", messages=[{"role": "user", "content": "Hi"}], options=GREEDY,
                                think=True, stream=True))
    assert "".join(c.message.thinking or "" for c in streamed) == thought.message.thinking
    plain = client.chat(model="toolgemma", messages=[{"role": "user", "content": "Hi"}], options=GREEDY, think=False)
    assert not plain.message.thinking and plain.message.content
    generated = client.generate(model="toolgemma", prompt="Hi", options=GREEDY, think=True)
    assert generated.thinking == thought.message.thinking


@pytest.mark.parametrize(("kwargs", "error"), [({"tools": [WEATHER_TOOL]}, '"gemma" does not support tools'),
                                               ({"think": True}, '"gemma" does not support thinking'),
                                               ({"think": "max"}, "invalid think value")])
def test_what_ollama_refuses_for_a_model_is_refused_the_same_way(client: ollama.Client, kwargs: dict,
                                                                 error: str) -> None:
    with pytest.raises(ollama.ResponseError, match=error) as raised:
        client.chat(model="gemma", messages=QUESTION, **kwargs)
    assert raised.value.status_code == 400


def test_langchain_bind_tools(fleet: Fleet) -> None:
    chat_ollama = pytest.importorskip("langchain_ollama")
    model = chat_ollama.ChatOllama(model="toolgemma", base_url=fleet.url, temperature=0, seed=42, num_predict=48,
                                   reasoning=False)
    call, *_ = model.bind_tools([get_weather]).invoke("What is the weather in Paris?").tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"], dict) and call["args"].get("city")


def test_litellm_ollama_chat_tools(fleet: Fleet) -> None:
    litellm = pytest.importorskip("litellm")
    answer = litellm.completion(model="ollama_chat/toolgemma", api_base=fleet.url, messages=QUESTION,
                                tools=[WEATHER_TOOL], temperature=0, seed=42, max_tokens=48)
    call, *_ = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and '"city"' in call.function.arguments


def test_openai_reasoning_effort_is_ollamas_think(fleet: Fleet) -> None:
    sdk = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    hi: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
    thought = sdk.chat.completions.create(model="toolgemma", messages=hi, max_tokens=48, temperature=0, seed=42,
                                          reasoning_effort="low")
    message = thought.choices[0].message
    assert getattr(message, "reasoning_content", None) and "<think>" not in (message.content or "")
    plain = sdk.chat.completions.create(model="toolgemma", messages=hi, max_tokens=48, temperature=0, seed=42,
                                        reasoning_effort="none")
    assert not getattr(plain.choices[0].message, "reasoning_content", None) and plain.choices[0].message.content
    streamed = list(sdk.chat.completions.create(model="toolgemma", messages=hi, max_tokens=48, temperature=0, seed=42,
                                                reasoning_effort="low", stream=True))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in streamed if c.choices) \
        == getattr(message, "reasoning_content", None)
    # What Ollama's /v1 refuses: thinking for a model whose template cannot, an effort it does not know.
    with pytest.raises(openai.BadRequestError, match='"gemma" does not support thinking'):
        sdk.chat.completions.create(model="gemma", messages=hi, reasoning_effort="high")
    with pytest.raises(openai.BadRequestError, match="invalid reasoning value: 'minimal'"):
        sdk.chat.completions.create(model="toolgemma", messages=hi, reasoning_effort="minimal")


def test_openai_python_tools_streamed_and_not(fleet: Fleet) -> None:
    sdk = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    asked = {"model": "toolgemma", "messages": QUESTION, "tools": [WEATHER_TOOL], "max_tokens": 48, "temperature": 0,
             "seed": 42, "reasoning_effort": "none"}
    answer = sdk.chat.completions.create(**asked)  # type: ignore[call-overload]
    call, *_ = answer.choices[0].message.tool_calls or [None]
    assert call is not None and call.type == "function" and call.function.name == "get_weather"
    # The model copies the template's example call, often until the token limit (finish_reason "length").
    assert json.loads(call.function.arguments)["city"]
    deltas = [d for c in sdk.chat.completions.create(**asked, stream=True) if c.choices  # type: ignore[call-overload]
              for d in c.choices[0].delta.tool_calls or () if d.index == 0]  # the first call's fragments
    assert "".join(d.function.name or "" for d in deltas if d.function) == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas if d.function))["city"]


def _city(text: str | None) -> City:
    return City.model_validate_json(text or "")


def _json_from_the_start(text: str | None) -> bool:
    """JSON mode bounds no string, so a tiny model's object may outrun the token budget; what the
    grammar guarantees is an object from the first token (unconstrained, this model echoes the question)."""
    return (text or "").lstrip().startswith("{") and '"' in (text or "")


def test_every_python_client_streams_thinks_and_follows_a_schema(fleet: Fleet, client: ollama.Client) -> None:
    # ollama: a schema and JSON mode.
    answer = client.chat(model="toolgemma", messages=CITY_QUESTION, format=CITY_SCHEMA, options=GREEDY | {"num_predict": 64},
                         think=False)
    assert _city(answer.message.content).city
    as_json = client.generate(model="toolgemma", prompt=CITY_QUESTION[0]["content"], format="json", think=False,
                              options=GREEDY | {"num_predict": 64})
    assert _json_from_the_start(as_json.response)

    # openai: the SDK's parse() sends a strict json_schema and validates the answer into the model.
    sdk = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    parsed = sdk.chat.completions.parse(model="toolgemma", messages=CITY_QUESTION, response_format=City,  # type: ignore[arg-type]
                                        max_tokens=64, temperature=0, seed=42, reasoning_effort="none")
    assert isinstance(parsed.choices[0].message.parsed, City)

    langchain_ollama = pytest.importorskip("langchain_ollama")
    chat = langchain_ollama.ChatOllama(model="toolgemma", base_url=fleet.url, temperature=0, seed=42, num_predict=64,
                                       reasoning=False)
    pieces = [piece.content for piece in chat.stream("Say hi")]
    assert len(pieces) >= 2 and "".join(str(p) for p in pieces) == chat.invoke("Say hi").content
    structured = chat.with_structured_output(City, method="json_schema").invoke("Which city is the capital of France?")
    assert isinstance(structured, City)
    thinking = langchain_ollama.ChatOllama(model="toolgemma", base_url=fleet.url, temperature=0, seed=42,
                                           num_predict=48, reasoning=True).invoke("Hi")
    assert thinking.additional_kwargs.get("reasoning_content") and "<think>" not in str(thinking.content)

    litellm = pytest.importorskip("litellm")
    asked = {"model": "ollama_chat/toolgemma", "api_base": fleet.url, "temperature": 0, "seed": 42,
             "reasoning_effort": "none"}
    chunks = list(litellm.completion(messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, stream=True,
                                     **asked))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed and streamed == litellm.completion(messages=[{"role": "user", "content": "Say hi"}], max_tokens=8,
                                                       **asked).choices[0].message.content
    schema = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}
    from_litellm = litellm.completion(messages=CITY_QUESTION, max_tokens=64, response_format=schema, **asked)
    assert _city(from_litellm.choices[0].message.content).country
    thought = litellm.completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=48,
                                 **(asked | {"reasoning_effort": "low"}))
    assert thought.choices[0].message.reasoning_content  # Ollama's `thinking`, as litellm names it


# llm's Python API in a process of its own: llm-ollama reads OLLAMA_HOST, and its cache's place
# (LLM_USER_PATH), when it is imported.
LLM_OLLAMA_SCRIPT = """
import json, sys
import llm

def get_weather(city: str) -> str:
    "Get the current weather of a city."
    return f"18 C and sunny in {city}"

model = llm.get_model("ollama/toolgemma")
greedy = {"temperature": 0, "seed": 42, "think": False}
facts = {"features": sorted(k for k in ("supports_tools", "supports_schema") if getattr(model, k, False))}
facts["chat"] = model.prompt("Say hi", stream=False, num_predict=8, **greedy).text()
facts["stream"] = list(model.prompt("Say hi", num_predict=8, **greedy))
called = model.prompt("What is the weather in Paris?", tools=[get_weather], num_predict=48, **greedy)
facts["tools"] = [{"name": c.name, "arguments": c.arguments} for c in called.tool_calls()]
facts["schema"] = model.prompt(sys.argv[1], schema=json.loads(sys.argv[2]), num_predict=64, **greedy).text()
facts["embedding_models"] = [m.model_id for m in llm.get_embedding_models() if m.model_id.startswith("ollama/")]
print(json.dumps(facts))
"""


def test_llm_ollama_chats_streams_calls_tools_and_follows_a_schema(fleet: Fleet) -> None:
    pytest.importorskip("llm_ollama")
    env = dict(os.environ, OLLAMA_HOST=fleet.url, LLM_USER_PATH=str(fleet.state_dir / "llm"))
    ran = subprocess.run([sys.executable, "-c", LLM_OLLAMA_SCRIPT, CITY_QUESTION[0]["content"], json.dumps(CITY_SCHEMA)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    facts = json.loads(ran.stdout)
    assert facts["features"] == ["supports_schema", "supports_tools"]  # from /api/show's capabilities
    assert facts["chat"] and "".join(facts["stream"]) == facts["chat"] and len(facts["stream"]) >= 2
    call, *_ = facts["tools"]
    assert call["name"] == "get_weather" and call["arguments"]["city"]
    assert _city(facts["schema"]).city
    # llm-ollama offers embeddings only for models whose capabilities say `embedding` (a pooling
    # GGUF), as Ollama reports them; a chat model gets none, here as from Ollama.
    assert facts["embedding_models"] == []


def test_python_clients_unload_with_keep_alive_zero(fleet: Fleet, client: ollama.Client) -> None:
    """Each unload is checked from an empty `ps`: the model is loaded again by the next client."""
    hi = [{"role": "user", "content": "Say hi"}]
    client.chat(model="toolgemma", messages=hi, options={"num_predict": 2}, think=False, keep_alive=0)
    wait_for(lambda: fleet.ps() == [], 30, "ollama's keep_alive=0 to unload")

    langchain_ollama = pytest.importorskip("langchain_ollama")
    langchain_ollama.ChatOllama(model="toolgemma", base_url=fleet.url, num_predict=2, reasoning=False,
                                keep_alive=0).invoke("Say hi")
    wait_for(lambda: fleet.ps() == [], 30, "langchain-ollama's keep_alive=0 to unload")

    litellm = pytest.importorskip("litellm")
    litellm.completion(model="ollama_chat/toolgemma", api_base=fleet.url, messages=hi, max_tokens=2, keep_alive=0,
                       reasoning_effort="none")
    wait_for(lambda: fleet.ps() == [], 30, "litellm's ollama_chat/ keep_alive=0 to unload")


def test_the_javascript_clients_ollama_js_and_openai_node(js_clients: Path, fleet: Fleet) -> None:
    env = dict(os.environ, NODE_PATH=str(js_clients))
    ran = subprocess.run(["node", str(JS_CLIENTS / "drive.cjs"), fleet.url, "toolgemma"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    facts = json.loads(ran.stdout)
    with_ollama, with_openai = facts["ollama"], facts["openai"]

    assert with_ollama["chat"]["content"] and with_ollama["chat"]["done"] and with_ollama["chat"]["eval_count"] == 8
    assert with_ollama["stream"]["text"] == with_ollama["chat"]["content"] and with_ollama["stream"]["pieces"] >= 3
    assert with_ollama["stream"]["done_only_last"] and with_ollama["stream"]["eval_count"] == 8
    call, *_ = with_ollama["tools"]["calls"]
    assert call["function"]["name"] == "get_weather" and isinstance(call["function"]["arguments"], dict)
    assert call["function"]["arguments"]["city"] and with_ollama["tools"]["follow_up_done"]
    assert with_ollama["tools"]["streamed_chunks_with_calls"] == 1  # whole calls in one chunk, as Ollama
    assert with_ollama["tools"]["streamed_calls"][0]["function"]["name"] == "get_weather"
    assert with_ollama["thinking"]["thinking"] and "<think>" not in with_ollama["thinking"]["content"]
    assert _city(with_ollama["format"]["schema"]).city and _json_from_the_start(with_ollama["format"]["json"])
    embed = with_ollama["embed"]
    assert embed["count"] == 2 and embed["dims"] == embed["legacy_dims"] == 640 and abs(embed["norm"] - 1) < 1e-3

    assert with_openai["chat"]["content"] and with_openai["chat"]["model"] == "toolgemma"
    assert with_openai["chat"]["completion_tokens"] == 8 and with_openai["chat"]["finish_reason"] == "length"
    assert with_openai["stream"]["text"] == with_openai["chat"]["content"] and with_openai["stream"]["models"] == ["toolgemma"]
    for calls in (with_openai["tools"]["calls"], with_openai["tools"]["forced_calls"]):
        assert calls and calls[0]["function"]["name"] == "get_weather"
        assert json.loads(calls[0]["function"]["arguments"])["city"]
    assert with_openai["tools"]["streamed_name"] == "get_weather"
    assert json.loads(with_openai["tools"]["streamed_arguments"])["city"]
    assert _city(with_openai["format"]["schema"]).country and _json_from_the_start(with_openai["format"]["json"])
    assert with_openai["thinking"]["reasoning_content"] and "<think>" not in (with_openai["thinking"]["content"] or "")
    assert with_openai["embed"]["model"] == "toolgemma" and with_openai["embed"]["dims"] == 640
    # The same vector through both clients (openai-node asked for base64 and decoded it).
    first, again = embed["first"], with_openai["embed"]["first"]
    assert sum(a * b for a, b in zip(first, again, strict=True)) / math.hypot(*again) > 0.9999
    assert sorted(with_openai["models"]) == sorted(with_ollama["list"]) == ["gemma:latest", "toolgemma:latest"]

    assert with_ollama["unload"]["done_reason"] == "unload"
    wait_for(lambda: fleet.ps() == [], 30, "ollama-js's keep_alive 0 to unload")
