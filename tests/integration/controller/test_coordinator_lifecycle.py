"""Coordinators that must recover, swap and agree: real rpc-servers killed, real models swapped."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.parse
from pathlib import Path

import ollama
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
GREEDY = {"temperature": 0, "seed": 7, "num_predict": 24}
PROMPT = "Once upon a time, in a small village by the sea,"



def raw_tokens(fleet: Fleet, model: str = "gemma") -> str:
    reply = ollama.Client(host=fleet.url).generate(model=model, prompt=PROMPT, raw=True, options=GREEDY)
    assert reply.eval_count == GREEDY["num_predict"] and reply.response is not None
    return reply.response


def test_three_backend_split_gives_the_same_tokens_as_one_backend(tmp_path: Path, llama_cpp: Manifest,
                                                                   test_model: Path) -> None:
    with running_fleet(tmp_path / "split", llama_cpp, test_model, agents=3,
                       controller_args=("--default-ctx", "16384")) as fleet:
        split = raw_tokens(fleet)
        assert len(fleet.ps()[0]["backends"]) == 3
    with running_fleet(tmp_path / "one", llama_cpp, test_model, agents=1, memory_limit="2GiB",
                       controller_args=("--default-ctx", "16384")) as fleet:
        alone = raw_tokens(fleet)
        assert len(fleet.ps()[0]["backends"]) == 1
    assert split == alone and split.strip()


def test_request_after_an_rpc_server_kill_succeeds_on_a_restarted_coordinator(tmp_path: Path, llama_cpp: Manifest,
                                                                               test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        before = raw_tokens(fleet)
        [loaded] = fleet.ps()
        victim = fleet.agents[0]
        old = victim.rpc()
        os.kill(old.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        # No wait, no manual step: the very next request must get its answer.
        after = raw_tokens(fleet)
        recovered_s = time.monotonic() - killed_at
        assert after == before
        assert victim.rpc().generation > old.generation
        [reloaded] = fleet.ps()
        assert reloaded["state"] == "ready" and reloaded["pid"] != loaded["pid"]
        assert reloaded["restarts"] >= 1
        print(f"recovered from an rpc-server SIGKILL in {recovered_s:.1f}s")


def test_backend_restart_while_idle_restarts_the_coordinator_before_any_request(tmp_path: Path, llama_cpp: Manifest,
                                                                                test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        raw_tokens(fleet)
        [loaded] = fleet.ps()
        os.kill(fleet.agents[1].rpc().pid, signal.SIGKILL)
        # The agent reports the new generation; the controller restarts on its own.
        wait_for(lambda: (d := fleet.ps()) and d[0]["state"] == "ready" and d[0]["pid"] != loaded["pid"], 60,
                 "a coordinator restarted without any request")
        assert "restarted (generation" in fleet.log_path.read_text()


def test_loading_a_second_model_that_does_not_fit_beside_the_first_unloads_the_idle_one(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        (fleet.models_dir / "gemma-copy.gguf").symlink_to(test_model)
        first = raw_tokens(fleet, "gemma")
        assert [d["model"] for d in fleet.ps()] == ["gemma:latest"]
        second = raw_tokens(fleet, "gemma-copy")
        assert [d["model"] for d in fleet.ps()] == ["gemma-copy:latest"]
        assert first == second
        assert "unloaded to make room for gemma-copy:latest" in fleet.log_path.read_text()
        raw_tokens(fleet, "gemma")
        assert [d["model"] for d in fleet.ps()] == ["gemma:latest"]


def hang_up_mid_stream(base_url: str, body: dict[str, object]) -> None:
    """Start a streamed /api/generate, read its first line, and close the socket."""
    url = urllib.parse.urlsplit(base_url)
    assert url.hostname is not None, url
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    connection.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    reply = connection.getresponse()
    assert reply.status == 200 and json.loads(reply.readline())["done"] is False
    assert connection.sock is not None
    connection.sock.close()
    connection.close()


def test_ollama_pool_route_skips_a_dead_node_and_serves_through_a_live_one(tmp_path: Path, llama_cpp: Manifest,
                                                                           test_model: Path) -> None:
    from llamafleet.common.llamacpp.probe import free_loopback_port

    dead = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens here
    with running_fleet(tmp_path / "node", llama_cpp, test_model, agents=2) as pool_node:
        # The front gateway has no agents and no model files: only the pool can answer.
        front = Fleet(None, f"http://127.0.0.1:{free_loopback_port()}", [], pool_node.token_file,
                      tmp_path / "front-state", tmp_path / "front-models", tmp_path / "front.log", llama_cpp, 0.3,
                      ("--ollama-node", dead, "--ollama-node", pool_node.url))
        front.models_dir.mkdir()
        front.start_controller([])
        try:
            client = ollama.Client(host=front.url)
            assert "gemma:latest" in [m.model for m in client.list().models]
            reply = client.generate(model="gemma", prompt=PROMPT, raw=True, options=GREEDY)
            assert reply.response and reply.eval_count == GREEDY["num_predict"]
            streamed = "".join(p.message.content or "" for p in client.chat(
                model="gemma", messages=[{"role": "user", "content": "hi"}], stream=True, options=GREEDY))
            assert streamed
            assert front.ps() == [] and [d["model"] for d in pool_node.ps()] == ["gemma:latest"]
            [down] = [n for n in json.loads(front.cli("pool", "--json").stdout) if n["url"] == dead]
            assert not down["healthy"] and down["error"]
            # Embeddings go the pool's way too, the fields we drop left behind.
            embedded = client.embed(model="gemma", input=["hi", "there"], options={"keep_alive": "5m"})
            assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 640
            # A client that hangs up mid-answer is its own business: one info line, the node stays up.
            before = len(front.log_path.read_text())
            hang_up_mid_stream(front.url, {"model": "gemma", "prompt": PROMPT, "options": {"num_predict": 200}})
            wait_for(lambda: "closed the connection" in front.log_path.read_text()[before:], 30, "the hang-up noticed")
            time.sleep(1)
            after = front.log_path.read_text()[before:]
            assert "Traceback" not in after and "is down" not in after, after
            [live] = [n for n in json.loads(front.cli("pool", "--json").stdout) if n["url"] == pool_node.url]
            assert live["healthy"]
        finally:
            front.stop_controller()
