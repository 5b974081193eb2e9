"""Metrics and the event log against a live fleet: what an operator's Prometheus and terminal see."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import running_agent, wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def events(fleet: Fleet) -> list[dict]:
    result = fleet.cli("events", "--json", "--limit", "500")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_controller_metrics_follow_nodes_coordinators_requests_and_refusals(tmp_path: Path, llama_cpp: Manifest,
                                                                           test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        client = ollama.Client(host=fleet.url)
        client.generate(model="gemma", prompt="Hello", raw=True, options={"num_predict": 6, "temperature": 0})
        client.generate(model="gemma", prompt="Hello", raw=True, options={"num_predict": 6, "temperature": 0})
        with pytest.raises(ollama.ResponseError) as refused:
            client.generate(model="gemma", prompt="x", options={"num_ctx": 900000})
        assert refused.value.status_code == 507
        m = scrape(f"{fleet.url}/metrics")
        assert value(m, "llamafleet_nodes", state="ready") == 2
        assert value(m, "llamafleet_coordinator_state", model="gemma:latest", state="ready") == 1
        assert value(m, "llamafleet_coordinator_state", model="gemma:latest", state="failed") == 0
        assert value(m, "llamafleet_generated_tokens_total", model="gemma:latest") == 12
        assert value(m, "llamafleet_time_to_first_token_seconds_count", model="gemma:latest") == 2
        assert value(m, "llamafleet_decode_tokens_per_second_count", model="gemma:latest") == 2
        assert value(m, "llamafleet_model_load_duration_seconds_count", model="gemma:latest") == 1
        assert value(m, "llamafleet_placement_failures_total", reason="memory") == 1
        assert value(m, "llamafleet_requests_total", api="ollama", code="200") == 2
        assert value(m, "llamafleet_requests_total", api="ollama", code="507") == 1
        assert value(m, "llamafleet_requests_in_flight", model="gemma:latest") == 0


def test_events_record_restarts_with_their_cause_and_follow_streams_new_ones(tmp_path: Path, llama_cpp: Manifest,
                                                                             test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        ollama.Client(host=fleet.url).generate(model="gemma", prompt="Hi", options={"num_predict": 2})
        follower = subprocess.Popen(fleet.cli_argv("events", "--follow", "--json", "--limit", "1"),
                                    stdout=subprocess.PIPE, text=True)
        try:
            assert follower.stdout is not None
            # The follower has read the past (its first line) before the kill: whatever comes
            # after is replayed to it, however late its stream connects.
            json.loads(follower.stdout.readline())
            os.kill(fleet.agents[0].rpc().pid, signal.SIGKILL)
            wait_for(lambda: any(e["kind"] == "rpc.restarted" for e in events(fleet)), 20, "the restart event")
            seen: list[dict] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not any(e["kind"] == "rpc.restarted" for e in seen):
                seen.append(json.loads(follower.stdout.readline()))
            assert any(e["kind"] == "rpc.restarted" for e in seen), seen
        finally:
            follower.terminate()
            follower.wait(timeout=10)
        log = events(fleet)
        kinds = [e["kind"] for e in log]
        restart = next(e for e in log if e["kind"] == "rpc.restarted")
        assert restart["subject"] == fleet.agents[0].address and "SIGKILL" in restart["message"]
        placement = next(e for e in log if e["kind"] == "placement")
        assert sorted(placement["data"]["backends"]) == sorted(a.rpc_endpoint for a in fleet.agents)
        assert "coordinator.ready" in kinds and "node.ready" in kinds
        # The coordinator was restarted because of it, and said why.
        wait_for(lambda: any(e["kind"] == "coordinator.stopping" and "restarted (generation" in e["message"]
                             for e in events(fleet)), 20, "the coordinator's restart event")
        table = fleet.cli("events", "--limit", "5")
        assert table.returncode == 0 and len(table.stdout.strip().splitlines()) == 5


def test_agent_metrics_on_their_own_port(tmp_path: Path, llama_cpp: Manifest) -> None:
    listen = f"127.0.0.1:{free_loopback_port()}"
    with running_agent(tmp_path, llama_cpp.install_dir,
                       extra_args=("--metrics-listen", listen, "--memory-limit", "300MiB")) as agent:
        wait_for(lambda: agent.rpc().state == pb.RPC_SERVER_STATE_RUNNING, 20, "the rpc-server running")
        m = scrape(f"http://{listen}/metrics")
        assert value(m, "llamafleet_agent_rpc_server_up") == 1
        assert value(m, "llamafleet_agent_rpc_server_generation") == agent.rpc().generation
        assert value(m, "llamafleet_agent_device_total_bytes", device="cpu", kind="cpu") == 300 * 2**20
        assert value(m, "llamafleet_agent_build_info", commit=llama_cpp.commit or "", source_id=llama_cpp.source_id,
                     rpc_protocol=llama_cpp.rpc_protocol_version, backends=",".join(llama_cpp.backends)) == 1
        os.kill(agent.rpc().pid, signal.SIGKILL)
        wait_for(lambda: value(scrape(f"http://{listen}/metrics"), "llamafleet_agent_rpc_server_restarts_total") == 1,
                 20, "the restart counted")
