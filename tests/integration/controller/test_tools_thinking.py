"""Tools and thinking through the gateway, with the clients people use, on real llama-server.

The model is gemma-3-270m's weights with a tool- and thinking-aware template written into the
GGUF (tests/fixtures/chat_template_gguf.py): llama-server analyses that template and parses the
model's calls and reasoning with the same code it uses for real models. Beside it, the plain
test GGUF (no template) is the model Ollama would refuse tools and thinking for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ollama
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.fixtures.chat_template_gguf import TOOLS_AND_THINKING_TEMPLATE, with_chat_template
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0, "seed": 42, "num_predict": 48}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


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
