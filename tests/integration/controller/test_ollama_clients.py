"""Ollama's leniency, embeddings, digests, version, CORS and the rest, with the clients people use.

One real agent and coordinator (gemma-3-270m over a real rpc-server); the clients are the
official `ollama` and `openai` packages, litellm, langchain-ollama and llm-ollama (each test
that needs one of the last three skips without it). The context is small so that an input
longer than the coordinator can embed is quick to make.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
CTX = 512
ALLOWED_SITE = "https://app.example.com"
SEA = "The sea is blue and wide."


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("clients")
    with running_fleet(tmp, llama_cpp, test_model, agents=1, memory_limit="1GiB",
                       controller_args=("--default-ctx", str(CTX), "--origins", ALLOWED_SITE)) as running:
        # A second model that is another file (one byte string more at its end): its own digest.
        other = running.models_dir / "other.gguf"
        shutil.copyfile(test_model, other)
        with other.open("ab") as out:
            out.write(b"another file")
        yield running


@pytest.fixture(scope="module")
def client(fleet: Fleet) -> ollama.Client:
    return ollama.Client(host=fleet.url)


def request(fleet: Fleet, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    sent = urllib.request.Request(fleet.url + path, data=data, method=method,
                                  headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(sent, timeout=120) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def norm(vector: Sequence[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def log_text(fleet: Fleet) -> str:
    return fleet.log_path.read_text(errors="replace")


def test_every_client_embeds_on_the_coordinator_that_also_chats(fleet: Fleet, client: ollama.Client) -> None:
    both = client.embed(model="gemma", input=[SEA, "Paris is the capital of France."])
    first, second = both.embeddings
    assert len(first) == len(second) == 640 and abs(norm(first) - 1) < 1e-3  # /api/embed normalises
    assert cosine(first, second) < 0.999 and both.prompt_eval_count is not None and both.prompt_eval_count > 8
    assert client.embed(model="gemma", input="").embeddings == []  # nothing to embed: a load, as Ollama
    short = client.embed(model="gemma", input=SEA, dimensions=64).embeddings[0]
    assert len(short) == 64 and abs(norm(short) - 1) < 1e-3
    legacy = client.embeddings(model="gemma", prompt=SEA).embedding  # the old route: the raw vector
    assert abs(norm(legacy) - 1) > 1e-2 and cosine(legacy, first) > 0.9999

    sdk = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    from_openai = sdk.embeddings.create(model="gemma", input=[SEA])  # the SDK asks for base64 and decodes it
    assert from_openai.model == "gemma" and cosine(from_openai.data[0].embedding, first) > 0.9999
    as_floats = sdk.embeddings.create(model="gemma", input=SEA, encoding_format="float", dimensions=32)
    assert len(as_floats.data[0].embedding) == 32 and as_floats.usage.prompt_tokens > 0

    langchain_ollama = pytest.importorskip("langchain_ollama")
    from_langchain = langchain_ollama.OllamaEmbeddings(model="gemma", base_url=fleet.url).embed_query(SEA)
    assert cosine(from_langchain, first) > 0.9999

    litellm = pytest.importorskip("litellm")
    from_litellm = litellm.embedding(model="ollama/gemma", input=[SEA], api_base=fleet.url)
    assert cosine(from_litellm.data[0]["embedding"], first) > 0.9999

    answer = client.chat(model="gemma", messages=[{"role": "user", "content": "Say hi"}], stream=False,
                         options={"temperature": 0, "num_predict": 4})
    assert answer.message.content and answer.eval_count == 4
    assert [d["model"] for d in fleet.ps()] == ["gemma:latest"]  # one coordinator served both


def test_an_input_longer_than_the_context_is_cut_unless_truncate_is_false(client: ollama.Client) -> None:
    long = "the sea " * CTX  # about 2 tokens a repeat: twice what a slot holds
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="gemma", input=long, truncate=False)
    assert refused.value.status_code == 400 and "exceeds the context length" in str(refused.value)
    cut = client.embed(model="gemma", input=[long, SEA])
    assert len(cut.embeddings) == 2 and cut.prompt_eval_count is not None and 0 < cut.prompt_eval_count <= CTX + 16


def test_what_ollama_ignores_is_dropped_counted_and_logged_once(fleet: Fleet) -> None:
    body = {
        "model": "gemma", "stream": False, "logprobs": True, "top_logprobs": 3, "truncate": True, "shift": False,
        "messages": [{"role": "System", "content": "Answer briefly."},
                     {"role": "User", "content": "Say hi", "name": "Ada"},
                     {"role": "assistant", "content": None},
                     {"role": "user", "content": "Again"}],
        "options": {"keep_alive": "5m", "draft_num_predict": 4, "rope_frequency_base": 10000.0,
                    "rope_frequency_scale": 1.0, "num_predict": 8.0, "temperature": 0, "n_discard": 4,
                    "id_slot": 7},
    }
    for _ in range(2):
        status, _, raw = request(fleet, "POST", "/api/chat", body)
        doc = json.loads(raw)
        assert status == 200 and doc["eval_count"] == 8 and doc["message"]["content"], doc
    log = log_text(fleet)
    assert log.count("dropping option 'keep_alive'") == 1 and "dropping field 'shift'" in log
    _, _, metrics = request(fleet, "GET", "/metrics")
    assert 'llamafleet_ignored_fields_total{api="ollama",kind="option",name="keep_alive"} 2.0' in metrics.decode()
    assert 'kind="message field",name="name"' in metrics.decode()  # OpenAI's, not Ollama's
    status, _, raw = request(fleet, "POST", "/api/chat", body | {"options": {"num_predict": "8"}})
    assert status == 400 and "option 'num_predict' must be an integer" in json.loads(raw)["error"]

    litellm = pytest.importorskip("litellm")
    # litellm's ollama/ provider puts keep_alive (and every other extra) into `options`.
    answer = litellm.completion(model="ollama/gemma", messages=[{"role": "user", "content": "Say hi"}],
                                api_base=fleet.url, keep_alive="5m", max_tokens=4, temperature=0)
    assert answer.choices[0].message.content


def test_digests_are_the_files_sha256_so_llm_ollama_keeps_two_models_apart(fleet: Fleet,
                                                                           client: ollama.Client) -> None:
    want = {p.stem + ":latest": hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (fleet.models_dir / "gemma.gguf", fleet.models_dir / "other.gguf")}
    wait_for(lambda: {m.model: m.digest for m in client.list().models} == want, 60, "both models' sha256")
    _, _, shown = request(fleet, "POST", "/api/show", {"model": "other"})  # the client's model drops the field
    assert json.loads(shown)["digest"] == want["other:latest"]
    client.generate(model="gemma", prompt="hi", options={"num_predict": 1})
    assert [m.digest for m in client.ps().models] == [want["gemma:latest"]]

    pytest.importorskip("llm_ollama")
    script = "import json; from llm_ollama.registry import _distinct_models; print(json.dumps(list(_distinct_models())))"
    env = dict(os.environ, OLLAMA_HOST=fleet.url, LLM_USER_PATH=str(fleet.state_dir / "llm"))
    listed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert listed.returncode == 0, listed.stderr
    names = sorted(name for name, _, _ in json.loads(listed.stdout))
    assert names == ["gemma:latest", "other:latest"]  # two models, not one under two names


def test_version_cors_model_lookup_context_and_error_texts(fleet: Fleet, client: ollama.Client) -> None:
    status, _, raw = request(fleet, "GET", "/api/version")
    assert status == 200 and json.loads(raw) == {"version": "0.12.0", "llamafleet": importlib.metadata.version("llamafleet")}

    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for origin in ("http://localhost:5173", "http://127.0.0.1:8080", ALLOWED_SITE, "tauri://localhost"):
        status, headers, _ = request(fleet, "OPTIONS", "/api/chat", headers={"Origin": origin, **preflight})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == origin, (origin, status)
        assert "POST" in headers["Access-Control-Allow-Methods"]
    status, headers, _ = request(fleet, "OPTIONS", "/api/chat", headers={"Origin": "https://evil.example",
                                                                          **preflight})
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers, raw = request(fleet, "POST", "/api/generate", {"model": "gemma", "prompt": "hi",
                                                                    "options": {"num_predict": 2}},
                                   headers={"Origin": ALLOWED_SITE})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED_SITE  # a streamed answer too

    sdk = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
    assert sdk.models.retrieve("gemma").id == "gemma"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("nothing-here")

    first = client.generate(model="gemma", prompt="My name is Ada.", options={"num_predict": 4, "temperature": 0})
    assert first.context and all(isinstance(t, int) for t in first.context)
    second = client.generate(model="gemma", prompt="What is my name?", context=first.context,
                             options={"num_predict": 4, "temperature": 0})
    assert second.response and second.context is not None and len(second.context) > len(first.context)

    status, _, raw = request(fleet, "POST", "/api/chat", {"model": "nothing-here", "messages": []})
    message = json.loads(raw)["error"]
    assert status == 404 and "not found" in message and str(fleet.models_dir) not in message and "/tmp" not in message


def test_a_client_that_hangs_up_mid_stream_is_one_info_line(fleet: Fleet, client: ollama.Client) -> None:
    before = len(log_text(fleet))
    url = urllib.parse.urlsplit(fleet.url)
    assert url.hostname is not None, url
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.request("POST", "/api/generate", json.dumps({"model": "gemma", "prompt": "Count to one hundred.",
                                                            "options": {"num_predict": 200}}),
                       {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and json.loads(reply.readline())["done"] is False
    connection.sock.close()  # gone mid-answer
    connection.close()
    wait_for(lambda: "closed the connection before the answer ended" in log_text(fleet)[before:], 30,
             "the gateway to notice the client left")
    time.sleep(1)
    after = log_text(fleet)[before:]
    assert after.count("closed the connection before the answer ended") == 1 and "Traceback" not in after, after
    answer = client.generate(model="gemma", prompt="hi", options={"num_predict": 2})
    assert answer.done  # the slot was given back


def test_a_generate_resumed_after_a_worker_died_still_carries_its_context(fleet: Fleet) -> None:
    body = {"model": "gemma", "prompt": "Count from 1 to 200.", "options": {"num_predict": 48, "temperature": 0}}

    def lines(kill_after: int | None = None) -> list[dict[str, Any]]:
        url = urllib.parse.urlsplit(fleet.url)
        assert url.hostname is not None, url
        connection = http.client.HTTPConnection(url.hostname, url.port, timeout=180)
        connection.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        docs = []
        for raw in connection.getresponse():
            docs.append(json.loads(raw))
            if len(docs) == kill_after:
                os.kill(fleet.agents[0].rpc().pid, signal.SIGKILL)  # the context is made on the healed one
        connection.close()
        return docs

    whole = lines()
    resumed = lines(kill_after=5)
    assert resumed[-1]["done"] and resumed[-1].get("resumed") == 1, resumed[-1]
    assert resumed[-1]["context"] == whole[-1]["context"]
