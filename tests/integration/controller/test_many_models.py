"""Many models and many users on one fleet, with real rpc-servers, coordinators and clients."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ollama
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
PROMPT = "Once upon a time, in a small village by the sea,"


def generate(fleet: Fleet, model: str, tokens: int = 8, timeout: float = 40) -> ollama.GenerateResponse:
    client = ollama.Client(host=fleet.url, timeout=timeout)
    return client.generate(model=model, prompt=PROMPT, raw=True,
                           options={"temperature": 0, "seed": 1, "num_predict": tokens})


def test_two_names_of_one_file_are_served_side_by_side_on_their_own_rpc_servers(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    # The user's report: after a chat with one model, a second name of the same GGUF hung for
    # minutes, because its coordinator was pointed at the rpc-server the first one held.
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2, memory_limit=("2GiB", "400MiB"),
                       model_names=("gemma", "gemma-copy")) as fleet:
        latencies: dict[str, list[float]] = {"gemma": [], "gemma-copy": []}
        for _ in range(3):
            for model in ("gemma", "gemma-copy"):
                started = time.monotonic()
                reply = generate(fleet, model)
                latencies[model].append(time.monotonic() - started)
                assert reply.eval_count == 8
        loaded = {d["model"]: d for d in fleet.ps()}
        assert set(loaded) == {"gemma:latest", "gemma-copy:latest"}
        assert all(d["state"] == "ready" for d in loaded.values())
        first, second = (set(loaded[m]["backends"]) for m in ("gemma:latest", "gemma-copy:latest"))
        assert not first & second, (first, second)
        # Nobody waited on the other's keep-alive: once loaded, each answer is quick.
        assert max(latencies["gemma"][1:] + latencies["gemma-copy"][1:]) < 10, latencies
        # `nodes` says which rpc-server serves which model.
        serving = {rpc["endpoint"]: rpc["model"] for n in fleet.nodes() for rpc in n["rpc_servers"] if rpc["model"]}
        assert {serving[e] for e in first} == {"gemma:latest"} and {serving[e] for e in second} == {"gemma-copy:latest"}
        # Unloaded, the extra rpc-server it was given is stopped again (after its idle grace).
        # The larger node has room for both, so the second model is on it, through its second
        # rpc-server (the case that hung): not merely elsewhere.
        extra = [e for e in first | second if e not in {a.rpc_endpoint for a in fleet.agents}]
        assert len(extra) == 1 and extra[0].split(":")[0] == fleet.agents[0].rpc_endpoint.split(":")[0], extra
        for model in ("gemma", "gemma-copy"):
            assert fleet.cli("stop", model).returncode == 0
        wait_for(lambda: all(rpc["state"] == "stopped" for n in fleet.nodes() for rpc in n["rpc_servers"]
                                 if rpc["endpoint"] in extra), 40, "the idle extra rpc-server stopped")
        print(f"alternating two models: latencies {latencies}")


def test_auto_slots_serve_eight_concurrent_streams_to_the_end(tmp_path: Path, llama_cpp: Manifest,
                                                             test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2, memory_limit="1GiB") as fleet:
        plan = json.loads(fleet.cli("plan", "gemma", "--json").stdout)
        slots = plan["estimate"]["parallel"]
        assert 1 < slots <= 8, plan["estimate"]

        def stream(i: int) -> int:
            client = ollama.Client(host=fleet.url, timeout=120)
            pieces = list(client.generate(model="gemma", prompt=f"{PROMPT} {i}", raw=True, stream=True,
                                          options={"temperature": 0, "num_predict": 16}))
            assert pieces[-1].done
            return pieces[-1].eval_count or 0

        with ThreadPoolExecutor(8) as pool:
            counts = list(pool.map(stream, range(8)))
        assert counts == [16] * 8
        [loaded] = fleet.ps()
        assert loaded["parallel"] == slots and loaded["queued"] == 0
        metrics = urllib.request.urlopen(f"{fleet.url}/metrics", timeout=10).read().decode()
        assert 'llamafleet_queue_depth{model="gemma:latest"} 0.0' in metrics


def _post_from(source: str, fleet: Fleet, body: dict[str, Any]) -> dict[str, Any]:
    """One request from the loopback address `source`: a second client, as the gateway sees it."""
    url = urllib.parse.urlsplit(fleet.url)
    assert url.hostname is not None, url
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=120, source_address=(source, 0))
    try:
        connection.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        connection.close()


def test_a_client_with_one_request_is_not_starved_by_one_with_many(tmp_path: Path, llama_cpp: Manifest,
                                                                   test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=1, memory_limit="1GiB",
                       controller_args=("--parallel", "1")) as fleet:
        generate(fleet, "gemma", 1)  # loaded: what follows measures turns, not the load
        body = {"model": "gemma", "prompt": PROMPT, "raw": True, "stream": False,
                "options": {"temperature": 0, "num_predict": 24}}
        finished: list[str] = []
        lock = threading.Lock()

        def one(source: str, name: str) -> None:
            _post_from(source, fleet, body)
            with lock:
                finished.append(name)

        with ThreadPoolExecutor(7) as pool:
            greedy = [pool.submit(one, "127.0.0.2", f"greedy{i}") for i in range(6)]
            # Every greedy request is in before the modest one arrives.
            wait_for(lambda: 'llamafleet_queue_depth{model="gemma:latest"} 5.0' in urllib.request.urlopen(
                f"{fleet.url}/metrics", timeout=10).read().decode(), 30, "five greedy requests queued")
            modest = pool.submit(one, "127.0.0.3", "modest")
            for future in [*greedy, modest]:
                future.result(timeout=180)
        # First come, first served would make it seventh; fair turns make it second.
        assert finished.index("modest") <= 2, finished
