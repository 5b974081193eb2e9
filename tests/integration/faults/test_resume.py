"""A worker's death is a pause, not a lost answer: rpc-servers killed for real mid-answer.

With temperature 0 the resumed answer must be, token for token, the answer of a run that was
never interrupted. Kill points are random (the seed is printed; LLAMAFLEET_TEST_RESUME_SEED
repeats a run); `pytest -s` prints the pauses.

The prompts make the tiny test model count. A resumed coordinator evaluates the tokens already
generated as one batch, which llama.cpp computes with other kernels than one token at a time:
the logits agree to the last few bits, and at a near-tie greedy decoding may then pick the other
token (gemma's story continuations have one about every 10 tokens; counting has none). The
README's "Failure behaviour" section says so.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from bench.netns import shaped_links
from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import AgentHost, Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
N = 96  # tokens per answer: long enough to kill in the middle, short enough for 2 cores
OPTIONS = {"num_predict": N, "temperature": 0, "seed": 3}
PROMPT = "Count from 1 to 200, one number after another: 1, 2, 3, 4,"
# The assistant's answer begun (a prefill): the test model then counts on.
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count from 1 to 200."},
                                          {"role": "assistant", "content": "1, 2, 3, 4,"}]
SEED = int(os.environ.get("LLAMAFLEET_TEST_RESUME_SEED", str(int(time.time()))))
RANDOM = random.Random(SEED)
print(f"resume kill points: seed {SEED}")


def ndjson(url: str, path: str, body: dict[str, Any]) -> tuple[http.client.HTTPConnection, Iterator[dict[str, Any]]]:
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None, parsed
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=180)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200, reply.read()
    return conn, (json.loads(line) for line in reply if line.strip())


def text_of(docs: list[dict[str, Any]]) -> str:
    return "".join(d.get("response") or (d.get("message") or {}).get("content") or "" for d in docs)


def stream(fleet: Fleet, path: str, body: dict[str, Any], kill_after: int | None = None,
           kill: Any = None) -> tuple[list[dict[str, Any]], float]:
    """The whole NDJSON answer; with `kill_after`, `kill()` runs after that many pieces. Returns
    the lines and the longest wait between two of them (the pause the client saw)."""
    conn, lines = ndjson(fleet.url, path, body)
    docs: list[dict[str, Any]] = []
    longest, last = 0.0, time.monotonic()
    try:
        for doc in lines:
            now = time.monotonic()
            longest, last = max(longest, now - last), now
            docs.append(doc)
            if kill_after is not None and len(docs) == kill_after:
                kill()
    finally:
        conn.close()
    return docs, longest


def kill_rpc_server(fleet: Fleet, index: int) -> None:
    os.kill(fleet.agents[index].rpc().pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path_factory.mktemp("resume"), llama_cpp, test_model, agents=2,
                       controller_args=("--resume-timeout", "90")) as started:
        yield started


# One fleet takes six kills in these tests, more than a coordinator's five failures in a row:
# an rpc-server that dies under a ready coordinator is the worker's failure, never a crash loop.
@pytest.mark.parametrize(("path", "body"), [
    ("/api/generate", {"model": "gemma", "prompt": PROMPT, "raw": True, "options": OPTIONS}),
    ("/api/chat", {"model": "gemma", "messages": CHAT, "options": OPTIONS}),
], ids=["generate", "chat"])
def test_a_killed_rpc_server_is_a_pause_and_the_answer_is_the_uninterrupted_one(
        fleet: Fleet, path: str, body: dict[str, Any]) -> None:
    whole, _ = stream(fleet, path, body)
    assert whole[-1]["done"] and whole[-1]["eval_count"] == N and "resumed" not in whole[-1]
    for victim in (0, 1):
        at = RANDOM.randint(3, N - 10)
        docs, pause = stream(fleet, path, body, at, lambda victim=victim: kill_rpc_server(fleet, victim))
        print(f"{path}: rpc-server {victim} killed after {at} pieces; paused {pause:.1f} s")
        assert "error" not in docs[-1], docs[-1]
        assert text_of(docs) == text_of(whole), f"kill after {at} pieces (seed {SEED})"
        final = docs[-1]
        assert final["done"] and final["resumed"] == 1 and final["eval_count"] == N
        assert final["prompt_eval_count"] == whole[-1]["prompt_eval_count"]
        assert all(not d["done"] for d in docs[:-1])
    events = fleet.cli("events", "--json").stdout
    assert "stream.resumed" in events


def test_an_openai_stream_and_a_one_json_answer_resume_too(fleet: Fleet) -> None:
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)

    def chat(kill_after: int | None) -> str:
        pieces = []
        for i, chunk in enumerate(client.chat.completions.create(
                model="gemma", messages=CHAT, max_tokens=N, temperature=0, seed=3, stream=True)):
            assert chunk.choices == [] or chunk.choices[0].logprobs is None  # not asked for, not sent
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if i == kill_after:
                kill_rpc_server(fleet, 1)
        return "".join(pieces)

    whole = chat(None)
    assert chat(RANDOM.randint(3, N - 10)) == whole

    # A one-JSON answer is streamed from the coordinator too: it simply comes later.
    body = {"model": "gemma", "prompt": PROMPT, "raw": True, "stream": False, "options": OPTIONS}
    conn, lines = ndjson(fleet.url, "/api/generate", body)
    expected = next(lines)["response"]
    conn.close()
    timer = threading.Timer(1.5, kill_rpc_server, (fleet, 0))
    timer.start()
    conn, lines = ndjson(fleet.url, "/api/generate", body)
    answer = next(lines)
    conn.close()
    timer.join()
    assert answer["response"] == expected and answer["eval_count"] == N


def test_a_model_that_cannot_come_back_ends_with_the_error_line_and_a_hang_up_ends_the_pause(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    # Both workers are needed; one is lost (agent and rpc-server): nowhere to resume.
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2,
                       controller_args=("--resume-timeout", "20")) as fleet:
        body = {"model": "gemma", "prompt": PROMPT, "raw": True, "options": OPTIONS}
        lost = fleet.agents[1]

        # A client that hangs up while its answer is paused: the gateway stops waiting for it.
        conn, lines = ndjson(fleet.url, "/api/generate", body)
        for _ in range(3):
            next(lines)
        lost.proc.kill()
        lost.proc.wait()
        time.sleep(2.0)  # into the pause: the coordinator is gone, the model cannot be placed
        conn.close()
        deadline = time.monotonic() + 10
        while "hung up" not in fleet.cli("events", "--json").stdout:
            assert time.monotonic() < deadline, "the paused request outlived its client"
            time.sleep(0.5)

        lost.start_again()
        wait_for(lambda: fleet.node(lost.address)["state"] == "ready", 30, "the worker back")

        def lose_worker() -> None:
            lost.proc.kill()
            lost.proc.wait()
        started = time.monotonic()
        docs, _ = stream(fleet, "/api/generate", body, 3, lose_worker)
        assert "error" in docs[-1] and docs[-1]["error"], docs[-1]
        assert all(not d.get("done") for d in docs)
        assert time.monotonic() - started < 60
        assert "stream.resume_failed" in fleet.cli("events", "--json").stdout


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                    reason="a cut link needs root and iproute2 (network namespaces the test makes itself)")
def test_a_cut_link_is_a_pause_and_the_answer_goes_on_without_that_worker(tmp_path: Path, llama_cpp: Manifest,
                                                                          test_model: Path) -> None:
    # Three workers, each in a network namespace of its own; the model needs two. One backend's
    # link is cut mid-answer: no RST, no FIN, so llama-server would wait on its socket for ever.
    with shaped_links(3) as links, running_fleet(
            tmp_path, llama_cpp, test_model, agents=3,
            hosts=tuple(AgentHost(link.worker_address, link.exec_prefix) for link in links)) as fleet:
        body = {"model": "gemma", "prompt": PROMPT, "raw": True, "options": OPTIONS}
        whole, _ = stream(fleet, "/api/generate", body)
        [before] = fleet.ps()
        victim = next(link for link in links if any(b.startswith(f"{link.worker_address}:") for b in before["backends"]))

        def cut() -> None:
            subprocess.run(["ip", "link", "set", victim.host_device, "down"], check=True)
        docs, pause = stream(fleet, "/api/generate", body, RANDOM.randint(3, N - 10), cut)
        print(f"a cut link: paused {pause:.1f} s")
        assert "error" not in docs[-1], docs[-1]
        assert text_of(docs) == text_of(whole) and docs[-1]["resumed"] == 1
        assert pause < 30, "a stuck connection held the answer"
        [after] = fleet.ps()
        assert not any(b.startswith(f"{victim.worker_address}:") for b in after["backends"])
        assert "accepts no connection" in fleet.cli("events", "--json").stdout
