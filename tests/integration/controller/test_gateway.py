"""The gateway with the official clients: gemma-3-270m split over three real agents.

One fleet serves the read-mostly tests of this module; tests that kill, unload or swap start
their own. Every agent advertises 260 MiB, and the default context is set so that the model
needs all three: every answer here crossed three rpc-servers.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0, "seed": 42, "num_predict": 16}
# Each agent advertises 260 MiB; at this context the model needs more than two of them.
SPREAD_OVER_THREE = ("--default-ctx", "16384")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("gateway"), llama_cpp, test_model, agents=3,
                       controller_args=SPREAD_OVER_THREE) as running:
        yield running


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> ollama.Client:
    return ollama.Client(host=fleet.url)



def test_first_chat_loads_the_model_across_three_backends_and_reports_the_load(fleet: Fleet, client: ollama.Client) -> None:
    first = client.chat(model="gemma", messages=[{"role": "user", "content": "Name a colour."}], stream=False,
                        options=GREEDY)
    assert first.done and first.message.role == "assistant" and first.message.content
    assert first.done_reason == "length" and first.eval_count == 16
    assert first.load_duration is not None
    assert first.load_duration > 100_000_000  # ns: this request waited for the load
    assert first.prompt_eval_count is not None and first.eval_duration is not None and first.total_duration is not None
    assert first.prompt_eval_count > 0 and first.eval_duration > 0 and first.total_duration >= first.load_duration
    second = client.chat(model="gemma", messages=[{"role": "user", "content": "Name a colour."}], stream=False,
                         options=GREEDY)
    assert second.load_duration == 0 and second.message.content == first.message.content
    [loaded] = fleet.ps()
    assert loaded["model"] == "gemma:latest" and loaded["state"] == "ready"
    assert sorted(loaded["backends"]) == sorted(a.rpc_endpoint for a in fleet.agents)
    assert sum(loaded["tensor_split"]) == 19  # 18 layers + the output layer


def test_chat_streams_pieces_then_one_final_object(client: ollama.Client) -> None:
    parts = list(client.chat(model="gemma", messages=[{"role": "user", "content": "Count to five."}], stream=True,
                             options=GREEDY))
    assert len(parts) >= 3 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].eval_count == 16 and parts[-1].done_reason == "length"
    text = "".join(p.message.content or "" for p in parts)
    whole = client.chat(model="gemma", messages=[{"role": "user", "content": "Count to five."}], stream=False,
                        options=GREEDY)
    assert text == whole.message.content


def test_generate_streamed_and_not_agree(client: ollama.Client) -> None:
    whole = client.generate(model="gemma", prompt="The capital of France is", stream=False, options=GREEDY)
    parts = list(client.generate(model="gemma", prompt="The capital of France is", stream=True, options=GREEDY))
    assert whole.response and "".join(p.response or "" for p in parts) == whole.response
    raw = client.generate(model="gemma", prompt="The capital of France is", raw=True, stream=False, options=GREEDY)
    assert raw.response and raw.eval_count == 16


def test_list_show_and_ps_describe_the_model(client: ollama.Client) -> None:
    [listed] = client.list().models
    assert listed.model == "gemma:latest" and listed.size is not None and listed.size > 200_000_000
    assert listed.details is not None
    assert listed.details.family == "gemma3" and listed.details.quantization_level == "Q4_K_M"
    shown = client.show("gemma")
    assert shown.capabilities is not None and shown.modelinfo is not None
    assert "completion" in shown.capabilities and shown.modelinfo["general.architecture"] == "gemma3"
    assert "tokenizer.ggml.tokens" not in shown.modelinfo  # a 262k-entry array is not sent
    assert shown.template == ""  # this GGUF carries no chat template (llama-server falls back to ChatML)
    client.generate(model="gemma", prompt="hi", options={"num_predict": 1})
    [running] = client.ps().models
    assert running.model == "gemma:latest" and running.size is not None and running.size > 0
    assert running.context_length == 16384


def test_openai_client_chat_completions_and_models(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused")
    answer = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Say hi"}],
                                            max_tokens=8, temperature=0, seed=42)
    assert answer.model == "gemma" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=8, temperature=0, seed=42, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.choices[0].message.content and all(c.model == "gemma" for c in chunks)
    completion = client.completions.create(model="gemma", prompt="One, two,", max_tokens=4, temperature=0)
    assert completion.choices[0].text and completion.model == "gemma"
    assert [m.id for m in client.models.list()] == ["gemma:latest"]


def _post(fleet: Fleet, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(fleet.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read().splitlines()[0])
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/api/chat", b'{"model": "gemma", "messages": [', 400, "invalid JSON"),
        ("/api/chat", b'{"model": "nothing-here", "messages": [{"role": "user", "content": "x"}]}', 404,
         "model 'nothing-here' not found"),
        ("/api/generate", b'{"model": "gemma", "prompt": "x", "options": {"num_ctx": 500000}}', 507, "does not fit"),
        ("/api/generate", b'{"model": "gemma", "prompt": "x", "options": {"temperature": "hot"}}', 400,
         "option 'temperature' must be a number"),
        ("/api/generate", b'{"model": "../../etc/passwd", "prompt": "x"}', 400, "invalid model name"),
        ("/api/generate", b'{"model": "gemma", "prompt": "x", "keep_alive": "soon"}', 400, "'keep_alive'"),
    ],
)
def test_bad_requests_get_a_status_and_one_line(fleet: Fleet, path: str, body: bytes, status: int, message: str) -> None:
    code, doc = _post(fleet, path, body)
    assert code == status and message in doc["error"], doc


def test_openai_errors_use_openai_shape(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="'max_tokens' must be an integer"):
        client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"max_tokens": "4"})
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="nothing-here", messages=[{"role": "user", "content": "x"}])


def test_ollama_client_sees_404_for_an_unknown_model(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="nothing-here", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404


def test_cli_run_streams_an_answer_and_stop_unloads(fleet: Fleet) -> None:
    result = fleet.cli("run", "gemma", "Say hi", "-o", "num_predict=12", "-o", "temperature=0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "tokens/s" in result.stderr
    stopped = fleet.cli("stop", "gemma")
    assert stopped.returncode == 0 and "stopped gemma:latest" in stopped.stdout
    assert fleet.ps() == []
    assert fleet.cli("ps").stdout.strip() == "no models loaded"
    again = fleet.cli("stop", "gemma")
    assert again.returncode == 1 and "not loaded" in again.stderr
    interactive = subprocess.run(fleet.cli_argv("run", "gemma", "-o", "num_predict=8"), input="hello\n/bye\n",
                                 capture_output=True,
                                 text=True, timeout=120)
    assert interactive.returncode == 0 and interactive.stdout.strip(), interactive.stderr
    assert "loaded gemma in" in interactive.stderr


def test_the_demos_answer_is_not_chatml(fleet: Fleet) -> None:
    # scripts/demo.sh's question. The GGUF has no template: llama-server's ChatML fallback made
    # the model continue with <|im_end|> and invented turns; gemma's built-in template does not.
    result = fleet.cli("run", "gemma", "Write one sentence about the sea.", "-o", "num_predict=64",
                       "-o", "temperature=0", "-o", "seed=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and not any(marker in result.stdout for marker in ("<|im_start|>", "<|im_end|>"))


def test_cli_run_of_a_model_that_does_not_fit_exits_3(fleet: Fleet) -> None:
    result = fleet.cli("run", "gemma", "x", "-o", "num_ctx=900000")
    assert result.returncode == 3 and "gemma:latest does not fit" in result.stderr
    assert "Traceback" not in result.stderr


def test_keep_alive_zero_unloads_after_the_request(fleet: Fleet, client: ollama.Client) -> None:
    client.generate(model="gemma", prompt="hi", options={"num_predict": 2}, keep_alive=0)
    wait_for(lambda: fleet.ps() == [], 15, "the model to unload after keep_alive 0")


def test_idle_model_unloads_after_its_keep_alive(fleet: Fleet, client: ollama.Client) -> None:
    client.generate(model="gemma", prompt="hi", options={"num_predict": 2}, keep_alive="2s")
    assert [d["model"] for d in fleet.ps()] == ["gemma:latest"]
    started = time.monotonic()
    wait_for(lambda: fleet.ps() == [], 20, "the idle model to unload")
    assert time.monotonic() - started >= 1.0  # not before its keep-alive


def test_load_only_and_unload_only_requests(fleet: Fleet, client: ollama.Client) -> None:
    loaded = client.generate(model="gemma", prompt="", keep_alive=-1)
    assert loaded.done and loaded.done_reason == "load"
    [doc] = fleet.ps()
    assert doc["state"] == "ready" and doc["expires_at_unix"] is None
    unloaded = client.generate(model="gemma", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload" and fleet.ps() == []
