"""Things killed for real, and what the user sees: an error line, a slower answer, never silence.

Recovery times are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
import urllib.parse
from pathlib import Path

import ollama
import openai
import psutil
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.process import wait_gone
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
SHORT = {"num_predict": 8, "temperature": 0, "seed": 3}
LONG = {"num_predict": 1500, "temperature": 0, "seed": 3}
PROMPT = "Once upon a time, in a small village by the sea,"



def answer(fleet: Fleet) -> ollama.GenerateResponse:
    return ollama.Client(host=fleet.url, timeout=120).generate(model="gemma", prompt=PROMPT, raw=True, options=SHORT)


def coordinators() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("llama-server") and "gemma:latest" in cmdline:
            found.append(proc)
    return found


def stream_lines(url: str, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None, parsed
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_without_resume_an_rpc_server_killed_mid_stream_ends_with_an_error_line_and_the_model_comes_back(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    # With resume (the default) the stream goes on instead: tests/integration/faults/test_resume.py.
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2, controller_args=("--no-resume",)) as fleet:
        answer(fleet)
        conn, reply = stream_lines(fleet.url, "/api/generate",
                                   {"model": "gemma", "prompt": PROMPT, "raw": True, "options": LONG})
        lines = [json.loads(reply.readline()) for _ in range(3)]
        os.kill(fleet.agents[0].rpc().pid, signal.SIGKILL)
        killed_at = time.monotonic()
        lines += [json.loads(line) for line in reply if line.strip()]
        conn.close()
        assert all(not doc.get("done") for doc in lines), "a stream cut by a dead backend must not look finished"
        assert "error" in lines[-1] and lines[-1]["error"], lines[-1]
        # No manual step: the next request gets an answer from a restarted coordinator.
        recovered = answer(fleet)
        recovery_s = time.monotonic() - killed_at
        assert recovered.done and recovered.eval_count == SHORT["num_predict"]
        print(f"rpc-server SIGKILL mid-stream: error line after {len(lines) - 1} pieces; "
              f"serving again {recovery_s:.1f}s after the kill")

        client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=1500, temperature=0, stream=True)
        next(iter(stream))
        os.kill(fleet.agents[1].rpc().pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        assert answer(fleet).done


def test_coordinator_kill_9_is_restarted_without_a_manual_step(tmp_path: Path, llama_cpp: Manifest,
                                                                test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        answer(fleet)
        [before] = fleet.ps()
        os.kill(before["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: (d := fleet.ps()) and d[0]["state"] == "ready" and d[0]["pid"] != before["pid"], 60,
                 "the coordinator restarted")
        print(f"coordinator SIGKILL: ready again after {time.monotonic() - killed_at:.1f}s")
        [after] = fleet.ps()
        assert after["restarts"] == before["restarts"] + 1 and "SIGKILL" in after["last_exit"]
        assert answer(fleet).done


def test_a_stopped_agent_is_unreachable_but_its_rpc_server_keeps_serving(tmp_path: Path, llama_cpp: Manifest,
                                                                         test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        answer(fleet)
        [before] = fleet.ps()
        agent = fleet.agents[0]
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: fleet.node(agent.address)["state"] == "unreachable", 10, "the stopped agent marked")
            assert answer(fleet).done  # a busy or frozen agent is not a dead backend
            assert fleet.ps()[0]["pid"] == before["pid"]
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: fleet.node(agent.address)["state"] == "ready", 10, "the agent ready again")
        assert fleet.ps()[0]["pid"] == before["pid"]


def test_a_lost_worker_is_replaced_by_a_spare_and_used_again_when_it_returns(tmp_path: Path, llama_cpp: Manifest,
                                                                            test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=3) as fleet:
        answer(fleet)
        [before] = fleet.ps()
        assert len(before["backends"]) == 2
        lost = next(a for a in fleet.agents if a.rpc_endpoint in before["backends"])
        spare = next(a for a in fleet.agents if a.rpc_endpoint not in before["backends"])
        lost.proc.kill()  # agent and, with it, its rpc-server
        lost.proc.wait()
        killed_at = time.monotonic()
        assert answer(fleet).done
        print(f"worker lost: answered from a re-placed coordinator {time.monotonic() - killed_at:.1f}s after the kill")
        [after] = fleet.ps()
        assert lost.rpc_endpoint not in after["backends"] and spare.rpc_endpoint in after["backends"]
        assert fleet.node(lost.address)["state"] == "unreachable"
        lost.start_again()
        wait_for(lambda: fleet.node(lost.address)["state"] == "ready", 20, "the worker back")
        fleet.cli("node", "maintenance", spare.address, "--on")
        fleet.cli("stop", "gemma")
        assert answer(fleet).done
        assert lost.rpc_endpoint in fleet.ps()[0]["backends"]


def test_a_lost_worker_without_a_spare_is_a_clear_507_until_it_returns(tmp_path: Path, llama_cpp: Manifest,
                                                                       test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        answer(fleet)
        lost = fleet.agents[1]
        lost.proc.kill()
        lost.proc.wait()
        with pytest.raises(ollama.ResponseError) as caught:
            answer(fleet)
        assert caught.value.status_code == 507 and "does not fit" in caught.value.error
        assert f"{lost.address}: node is unreachable" in caught.value.error
        lost.start_again()
        wait_for(lambda: fleet.node(lost.address)["state"] == "ready", 20, "the worker back")
        assert answer(fleet).done


def test_controller_kill_9_leaves_no_orphan_and_reloads_what_was_loaded(tmp_path: Path, llama_cpp: Manifest,
                                                                        test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=2) as fleet:
        answer(fleet)
        [before] = fleet.ps()
        assert [p.pid for p in coordinators()] == [before["pid"]]
        fleet.stop_controller(signal.SIGKILL)
        assert wait_gone(before["pid"], 10), "llama-server outlived its controller"
        fleet.start_controller([a.address for a in fleet.agents])
        wait_for(lambda: (d := fleet.ps()) and d[0]["state"] == "ready", 60, "the model reloaded")
        assert len(coordinators()) == 1 and coordinators()[0].pid != before["pid"]
        assert answer(fleet).done
        assert len(coordinators()) == 1
