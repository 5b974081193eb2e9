"""A worker's death is a pause, not a lost answer: rpc-servers killed for real mid-answer.

With temperature 0 the resumed answer must be, token for token, the answer of a run that was
never interrupted. Kill points are random (the seed is printed; LLAMAFLEET_TEST_RESUME_SEED
repeats a run); `pytest -s` prints the pauses.

The kill tests make the tiny test model count, whose greedy answer has no near-tie. A resumed
coordinator evaluates the tokens already generated after the prompt; stock llama-server batches
them, with other kernels than the one-at-a-time decoding of the uninterrupted answer, so at a
near-tie greedy decoding may take the other token. Patch 0005 decodes that tail one token at a
time; the story answers of the exactness test have near-ties and show both. The bounds of a
resume (its timeout, its attempts, --no-resume) restart the module fleet's controller on other
flags and end with the error line.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import shutil
import signal
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from bench import resume_exactness
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
    # The module's tests kill its rpc-servers a dozen times within minutes, each well inside the
    # agent's default 30 s healthy reset: its restart back-off would grow past what the controller
    # waits, and after five it would stop restarting them (the crash-loop policy, tested in
    # test_supervisor_policy.py). Here a second of running counts as healthy.
    healthy_soon = ("--healthy-reset-s", "1")
    with running_fleet(tmp_path_factory.mktemp("resume"), llama_cpp, test_model, agents=2,
                       controller_args=("--resume-timeout", "90"), agent_args=(healthy_soon, healthy_soon)) as started:
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


@contextmanager
def controller_flags(fleet: Fleet, *flags: str) -> Iterator[None]:
    """The module's fleet with its controller restarted on `flags` (the agents keep running, so
    this costs a controller start and a load); its own flags are restored after."""
    def restart(args: tuple[str, ...]) -> None:
        fleet.stop_controller()
        fleet.controller_args = args
        fleet.start_controller([a.address for a in fleet.agents])
        wait_for(lambda: all(n["state"] == "ready" and n["rpc_server"]["state"] == "running"
                             for n in fleet.nodes()), 60, "every node ready")
    own = fleet.controller_args
    restart(flags)
    try:
        yield
    finally:
        restart(own)


def events_of(fleet: Fleet, kind: str, after: int = 0) -> list[dict[str, Any]]:
    """The events of `kind` with an id above `after` (the log outlives a controller restart)."""
    return [e for e in json.loads(fleet.cli("events", "--json", "--limit", "1000").stdout)
            if e["kind"] == kind and e["id"] > after]


def last_event_id(fleet: Fleet) -> int:
    return max((e["id"] for e in json.loads(fleet.cli("events", "--json", "--limit", "1").stdout)), default=0)


GENERATE = {"model": "gemma", "prompt": PROMPT, "raw": True, "options": OPTIONS}


def test_a_pause_longer_than_the_resume_timeout_ends_with_the_error_line(fleet: Fleet) -> None:
    # The agent is frozen, so nobody restarts the rpc-server killed under the answer: the model
    # cannot be ready again (restarts back off, 0.5 s + 1 s + 2 s ..., far past the timeout).
    agent = fleet.agents[1]
    with controller_flags(fleet, "--resume-timeout", "2s"):
        whole, _ = stream(fleet, "/api/generate", GENERATE)
        before = last_event_id(fleet)
        killed_at = 0.0

        def freeze_and_kill() -> None:
            nonlocal killed_at
            pid = agent.rpc().pid
            agent.proc.send_signal(signal.SIGSTOP)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
        try:
            docs, _ = stream(fleet, "/api/generate", GENERATE, RANDOM.randint(3, N - 30), freeze_and_kill)
            ended_after = time.monotonic() - killed_at
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        error = docs[-1].get("error", "")
        assert "the model was not ready again within 2 s" in error, docs[-1]
        assert "\n" not in error and "Traceback" not in error
        assert all(not d.get("done") for d in docs)
        assert text_of(whole).startswith(text_of(docs))  # what came before the error is the answer's start
        assert 2 <= ended_after < 10, f"the error line came {ended_after:.1f} s after the kill"
        [failed] = events_of(fleet, "stream.resume_failed", before)
        assert "within 2 s" in failed["message"]


def test_a_failure_beyond_the_resume_attempts_ends_with_the_error_line(fleet: Fleet) -> None:
    # The default --resume-attempts (2): two kills are pauses, the third ends the answer.
    with controller_flags(fleet, "--resume-timeout", "90"):
        whole, _ = stream(fleet, "/api/generate", GENERATE)
        before = last_event_id(fleet)
        conn, lines = ndjson(fleet.url, "/api/generate", GENERATE)
        docs: list[dict[str, Any]] = []
        kills, pauses, since_kill = 0, 0, None
        last = time.monotonic()
        try:
            for doc in lines:
                now = time.monotonic()
                if since_kill is not None and now - last > 1.0 and "error" not in doc:
                    pauses += 1  # the heal takes seconds: the first piece after a long gap is the resumed stream
                    since_kill = None
                last = now
                docs.append(doc)
                if since_kill is None and len(docs) >= 4 + 8 * kills and kills < 3 and not doc.get("done"):
                    kill_rpc_server(fleet, kills % 2)
                    kills, since_kill = kills + 1, len(docs)
        finally:
            conn.close()
        assert kills == 3 and pauses == 2, (kills, pauses, docs[-1])
        error = docs[-1].get("error", "")
        assert "coordinator" in error and "\n" not in error and "ready again" not in error, docs[-1]
        assert all(not d.get("done") for d in docs)
        assert text_of(whole).startswith(text_of(docs))
        assert len(events_of(fleet, "stream.resumed", before)) == 2
        assert len(events_of(fleet, "stream.resume_failed", before)) == 1


def test_no_resume_keeps_the_error_line_at_the_first_kill(fleet: Fleet) -> None:
    with controller_flags(fleet, "--no-resume"):
        whole, _ = stream(fleet, "/api/generate", GENERATE)
        before = last_event_id(fleet)
        docs, _ = stream(fleet, "/api/generate", GENERATE, RANDOM.randint(3, N - 30),
                         lambda: kill_rpc_server(fleet, 0))
        error = docs[-1].get("error", "")
        assert "coordinator" in error and "\n" not in error, docs[-1]
        assert all(not d.get("done") for d in docs)
        assert text_of(whole).startswith(text_of(docs))
        assert not events_of(fleet, "stream.resumed", before) and not events_of(fleet, "stream.resume_failed", before)


EXACT_TAIL_PATCH = "0005-server-decode-generated-prompt-tail.patch"


def test_a_greedy_answer_resumed_anywhere_is_the_uninterrupted_one(fleet: Fleet, llama_cpp: Manifest) -> None:
    # The fleet's own coordinator (two RPC backends), asked the gateway's continuation request
    # (gateway/resume.py) after every other token of story answers, which have near-ties: with
    # n_decode_tail each is the uninterrupted rest; without it (stock llama-server's batched
    # evaluation) some take the other token. The kill that leads to such a request is tested above.
    if EXACT_TAIL_PATCH not in llama_cpp.patch_names:
        pytest.skip(f"the llama.cpp build lacks {EXACT_TAIL_PATCH}, which makes a resume exact")
    stream(fleet, "/api/generate", GENERATE)  # loaded
    [deployment] = fleet.ps()
    # A story whose answer has near-ties on the CPU backend (the bench tries more).
    specs = resume_exactness.story_specs(1, resume_exactness.STORIES[1], 20)
    batched = asyncio.run(resume_exactness.measure(deployment["url"], specs, 2, False, None, horizon=8))
    exact = asyncio.run(resume_exactness.measure(deployment["url"], specs, 2, True, batched["answers"], horizon=8))
    print(f"resumed after every other token: {batched['differ']} of {batched['resumes']} differ batched, "
          f"{exact['differ']} of {exact['resumes']} with the tail decoded")
    print("\n".join(batched["where"]))
    assert exact["differ"] == 0 and not exact["where"], exact["where"]
    # Else these prompts had no near-tie on this machine, and the line above proved nothing.
    assert batched["differ"] > 0, "no resume differed without n_decode_tail: pick prompts with near-ties"


def test_a_stock_llama_server_still_resumes(fleet: Fleet, stock_llama_cpp: Manifest) -> None:
    # The coordinator from a build without the patches (the rpc-servers keep theirs: the
    # protocol is the same): it ignores n_decode_tail, and the answer still goes on.
    with controller_flags(fleet, "--resume-timeout", "90", "--llama-cpp", str(stock_llama_cpp.install_dir)):
        whole, _ = stream(fleet, "/api/generate", GENERATE)
        [deployment] = fleet.ps()
        assert Path(f"/proc/{deployment['pid']}/exe").resolve() == Path(stock_llama_cpp.llama_server).resolve()
        docs, pause = stream(fleet, "/api/generate", GENERATE, RANDOM.randint(3, N - 10),
                             lambda: kill_rpc_server(fleet, 1))
        print(f"stock coordinator: paused {pause:.1f} s")
        assert "error" not in docs[-1], docs[-1]
        # Counting has no near-tie: the same answer even without the guarantee.
        assert text_of(docs) == text_of(whole) and docs[-1]["resumed"] == 1 and docs[-1]["eval_count"] == N


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

        docs, pause = stream(fleet, "/api/generate", body, RANDOM.randint(3, N - 10), lambda: victim.set_up(False))
        print(f"a cut link: paused {pause:.1f} s")
        assert "error" not in docs[-1], docs[-1]
        assert text_of(docs) == text_of(whole) and docs[-1]["resumed"] == 1
        assert pause < 30, "a stuck connection held the answer"
        [after] = fleet.ps()
        assert not any(b.startswith(f"{victim.worker_address}:") for b in after["backends"])
        assert "accepts no connection" in fleet.cli("events", "--json").stdout
