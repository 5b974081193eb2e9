"""Whatever a coordinator sends, the client gets its answer or a clear error: never a truncated success.

The coordinator here is tests/integration/faults/misbehaving_llama_server.py, started by the real
controller in place of llama-server over a real agent's rpc-server: the misbehaviour (a malformed
event, a list where an object belongs, a wrong type, invalid UTF-8, a body that ends before the
final chunk or is cut mid-way, a coordinator that hangs) is the point, and only a fake does it
on purpose. Each mode is tried with the official ollama and openai clients and with raw HTTP,
streaming and not. A stream that already began must end with the API's error line (no `done`,
no `[DONE]`); an answer not yet begun is a JSON 502 (a 503 once a coordinator that cut its answers
was restarted for it too often in a row). A hung coordinator is the client's timeout,
after which the slot is free again (`--parallel 1`: a slot held for the gone client would block
the next request).

`--no-resume`: a stream cut mid-answer would otherwise be resumed (tests/integration/faults/
test_resume.py's business); here it must end with the error line.
"""

from __future__ import annotations

import http.client
import json
import shutil
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from llamafleet.common.llamacpp.install import MANIFEST_NAME, Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
FAKE = Path(__file__).with_name("misbehaving_llama_server.py")
BAD_MODES = ("malformed", "list", "wrong_type", "bad_utf8", "cut", "close")
GOOD = "Hello there"  # what the fake answers when it behaves
HANG_TIMEOUT_S = 2.0


class RawError(Exception):
    """A raw client saw the error it should: a JSON 502, or the stream's error line."""


def fake_install(tmp: Path, real: Manifest) -> Manifest:
    """A llama.cpp install whose llama-server is the fake (its rpc-server the real one)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / Path(real.rpc_server).name).symlink_to(real.rpc_server)
    script = bin_dir / "llama-server"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    script.chmod(0o755)
    manifest = replace(real, key="misbehaving", rpc_server=str(bin_dir / Path(real.rpc_server).name),
                       llama_server=str(script), patches=[])
    (tmp / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("garbage")
    fake = fake_install(tmp / "fake-llama-cpp", llama_cpp)
    with running_fleet(tmp, fake, test_model, agents=1, memory_limit="2GiB", agent_llama_cpp=llama_cpp,
                       controller_args=("--no-resume", "--parallel", "1")) as fleet:
        yield fleet


# ---- the clients: each returns the answer's text, or raises what it raises -----------------------

def ollama_client(fleet: Fleet, timeout: float | None = 30) -> ollama.Client:
    return ollama.Client(host=fleet.url, timeout=timeout)


def openai_client(fleet: Fleet, timeout: float | None = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def ollama_generate(fleet: Fleet, prompt: str, stream: bool, timeout: float | None = 30) -> str:
    client = ollama_client(fleet, timeout)
    if not stream:
        return client.generate(model="gemma", prompt=prompt, raw=True).response or ""
    text = ""
    done = False
    for part in client.generate(model="gemma", prompt=prompt, raw=True, stream=True):
        text += part.response or ""
        done = bool(part.done)
    assert done, f"the stream ended without its last line or an error: {text!r}"
    return text


def ollama_chat(fleet: Fleet, prompt: str, stream: bool, timeout: float | None = 30) -> str:
    client = ollama_client(fleet, timeout)
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        return client.chat(model="gemma", messages=messages).message.content or ""
    text = ""
    done = False
    for part in client.chat(model="gemma", messages=messages, stream=True):
        text += part.message.content or ""
        done = bool(part.done)
    assert done, f"the stream ended without its last line or an error: {text!r}"
    return text


def openai_chat(fleet: Fleet, prompt: str, stream: bool, timeout: float | None = 30) -> str:
    client = openai_client(fleet, timeout)
    if not stream:
        reply = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": prompt}])
        content = reply.choices[0].message.content
        assert isinstance(content, str), f"a wrong-typed answer reached the client: {reply!r}"
        return content
    text = ""
    for chunk in client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": prompt}],
                                                stream=True):
        for choice in chunk.choices:
            assert choice.delta.content is None or isinstance(choice.delta.content, str), chunk
            text += choice.delta.content or ""
    return text


def openai_completion(fleet: Fleet, prompt: str, stream: bool, timeout: float | None = 30) -> str:
    client = openai_client(fleet, timeout)
    if not stream:
        reply = client.completions.create(model="gemma", prompt=prompt)
        assert isinstance(reply.choices[0].text, str), f"a wrong-typed answer reached the client: {reply!r}"
        return reply.choices[0].text
    text = ""
    for chunk in client.completions.create(model="gemma", prompt=prompt, stream=True):
        for choice in chunk.choices:
            assert isinstance(choice.text, str), chunk
            text += choice.text
    return text


def _connect(fleet: Fleet, timeout: float | None) -> http.client.HTTPConnection:
    parsed = urllib.parse.urlsplit(fleet.url)
    assert parsed.hostname is not None
    return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)


def _post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> http.client.HTTPResponse:
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    if reply.status != 200:
        raw = reply.read()
        # 502: what the coordinator sent was wrong; 503: it was restarted for it, and failed again.
        assert reply.status in (502, 503), (reply.status, raw)
        assert reply.getheader("Content-Type", "").startswith("application/json"), raw
        doc = json.loads(raw)
        error = doc["error"]["message"] if path.startswith("/v1/") else doc["error"]
        assert isinstance(error, str) and error, doc
        raise RawError(error)
    return reply


def raw_ndjson(fleet: Fleet, prompt: str, stream: bool, timeout: float | None = 30) -> str:
    with closing(_connect(fleet, timeout)) as conn:  # closed on a timeout too: the hang-up
        reply = _post(conn, "/api/generate", {"model": "gemma", "prompt": prompt, "raw": True, "stream": stream})
        if not stream:
            return str(json.loads(reply.read())["response"])
        docs = [json.loads(line) for line in reply if line.strip()]
    if docs and docs[-1].get("error"):
        assert not any(d.get("done") for d in docs), docs
        raise RawError(docs[-1]["error"])
    assert docs and docs[-1].get("done"), f"the stream ended without its last line or an error: {docs}"
    return "".join(d.get("response", "") for d in docs)


def raw_sse(fleet: Fleet, prompt: str, stream: bool, timeout: float | None = 30) -> str:
    with closing(_connect(fleet, timeout)) as conn:
        reply = _post(conn, "/v1/chat/completions",
                      {"model": "gemma", "messages": [{"role": "user", "content": prompt}], "stream": stream})
        if not stream:
            return str(json.loads(reply.read())["choices"][0]["message"]["content"])
        data = [line[5:].strip() for line in reply if line.startswith(b"data:")]
    if data and data[-1] != b"[DONE]":
        error = json.loads(data[-1]).get("error")
        assert error and error.get("message"), f"the stream ended without [DONE] or an error: {data}"
        raise RawError(error["message"])
    assert data, "an empty stream"
    return "".join((json.loads(d)["choices"] or [{}])[0].get("delta", {}).get("content") or "" for d in data[:-1])


Client = Callable[..., str]
CLIENTS: dict[str, Client] = {"ollama generate": ollama_generate, "ollama chat": ollama_chat,
                              "openai chat": openai_chat, "openai completion": openai_completion,
                              "raw /api/generate": raw_ndjson, "raw /v1/chat/completions": raw_sse}
# What each client raises for an error the server reported: a status, or the stream's error line.
CLEAR_ERRORS = (ollama.ResponseError, openai.APIError, RawError)
TIMEOUTS = (httpx.TimeoutException, openai.APITimeoutError, TimeoutError)


@pytest.mark.skipif(shutil.which("sh") is None, reason="the fake llama-server is started by a shell script")
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "one answer"])
@pytest.mark.parametrize("name", list(CLIENTS))
def test_every_misbehaviour_is_a_clear_error_for_every_client(fleet: Fleet, name: str, stream: bool) -> None:
    client = CLIENTS[name]
    assert client(fleet, "MODE=ok", stream) == GOOD  # the control: a fake that behaves is answered
    badly: list[str] = []
    for mode in BAD_MODES:
        try:
            text = client(fleet, f"MODE={mode}", stream)
        except CLEAR_ERRORS as exc:
            message = str(exc)
            if isinstance(exc, ollama.ResponseError) and not stream:
                assert exc.status_code in (502, 503), (mode, exc.status_code, message)
            if isinstance(exc, openai.APIStatusError):
                assert exc.status_code in (502, 503), (mode, exc.status_code, message)
            assert message and "Traceback" not in message, (mode, message)
        except AssertionError as exc:
            badly.append(f"{mode}: {exc}")
        else:
            badly.append(f"{mode}: answered {text!r} as if nothing were wrong")
    assert not badly, "\n".join(badly)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "one answer"])
@pytest.mark.parametrize("name", list(CLIENTS))
def test_a_hung_coordinator_is_the_clients_timeout_and_frees_its_slot(fleet: Fleet, name: str, stream: bool) -> None:
    client = CLIENTS[name]
    with pytest.raises(TIMEOUTS):
        client(fleet, "MODE=hang", stream, timeout=HANG_TIMEOUT_S)
    # The one slot is free again: the next request is answered, not queued behind a gone client.
    assert client(fleet, "MODE=ok", stream, timeout=30) == GOOD
    wait_for(lambda: all(m["in_flight"] == 0 and m["queued"] == 0 for m in fleet.ps()), 10,
             "no request held for a gone client")

