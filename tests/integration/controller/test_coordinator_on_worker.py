"""The coordinator runs where the weights are: llama-server on the worker with the largest share.

Real agents that hold the model file, a real controller; the coordinator's llama-server runs as
the agent's child on the worker, computes that worker's share on its own CPU, reaches the other
share over RPC, and is reached by the gateway only through the agent's keyed proxy. Its death,
its worker's death and a controller restart are each healed for real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import ollama
import psutil
import pytest

from bench.netns import shaped_links
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.node_auth import coordinator_key
from llamafleet.common.process import wait_gone
from tests.integration.agent.harness import wait_for
from tests.integration.agent.test_agent_tls import _pki
from tests.integration.controller.harness import AgentHost, Fleet, holder_stores, running_fleet
from tests.integration.controller.test_patched_load import FAKE, _output_entry, hash_files
from tests.integration.controller.test_prestage import saved_lines
from tests.integration.faults.test_resume import ndjson, stream, text_of

pytestmark = pytest.mark.integration
N = 64
OPTIONS = {"num_predict": N, "temperature": 0, "seed": 3}
PROMPT = "Count from 1 to 200, one number after another: 1, 2, 3, 4,"
GENERATE = {"model": "gemma", "prompt": PROMPT, "raw": True, "options": OPTIONS}


def holders_known(fleet: Fleet) -> dict[str, Any] | None:
    result = fleet.cli("plan", "gemma", "--json")
    if result.returncode != 0:
        return None
    doc = json.loads(result.stdout)
    return doc if doc.get("coordinator") not in (None, "controller") else None


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("coordinator-on-worker")
    with running_fleet(root / "fleet", llama_cpp, test_model, agents=3,
                       agent_args=holder_stores(root, test_model, 3)) as started:
        # The controller names holders once it and the agents have hashed the file.
        wait_for(lambda: holders_known(started), 60, "the plan to put the coordinator on a worker")
        yield started


def loaded(fleet: Fleet) -> dict[str, Any]:
    [doc] = fleet.ps()
    assert doc["state"] == "ready", doc
    return doc


def test_the_plan_and_ps_say_where_the_coordinator_runs_and_it_answers(fleet: Fleet) -> None:
    plan = holders_known(fleet)
    assert plan is not None and "largest share" in plan["coordinator_reason"]
    shown = fleet.cli("plan", "gemma").stdout
    assert f"coordinator: on {plan['coordinator']}" in shown
    reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt=PROMPT, raw=True, options=OPTIONS)
    assert reply.done and reply.eval_count == N and (reply.response or "").strip()
    doc = loaded(fleet)
    worker = next(a for a in fleet.agents if a.address == doc["coordinator"])
    # Its own share is not behind an rpc-server: only the others' are.
    assert worker.rpc_endpoint not in doc["backends"] and len(doc["backends"]) == len(doc["nodes"]) - 1
    assert doc["coordinator"] in fleet.cli("ps").stdout
    # llama-server is the agent's child, on the worker, listening on loopback only.
    process = psutil.Process(doc["pid"])
    assert process.ppid() == worker.proc.pid and "llama-server" in process.name()
    listening = {c.laddr.ip for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}, listening
    # The plan's event says so too.
    assert f"coordinator on {doc['coordinator']}" in fleet.cli("events", "--json").stdout


def _get(url: str, key: str | None = None, body: dict[str, Any] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_proxy_opens_only_with_the_coordinators_key_and_only_the_gateways_routes(fleet: Fleet) -> None:
    ollama.Client(host=fleet.url).generate(model="gemma", prompt="Hi", options={"num_predict": 2})
    doc = loaded(fleet)
    url = doc["url"]
    assert url.startswith("http://127.0.0.") and "/c/" in url  # the worker's --rpc-host
    coordinator_id = url.rsplit("/c/", 1)[1]
    key = coordinator_key(fleet.token_file.read_text().strip(), coordinator_id)
    assert _get(f"{url}/health")[0] == 401  # no key: not even health
    assert _get(f"{url}/health", "wrong")[0] == 401
    other = url.rsplit("/c/", 1)[0] + "/c/" + "0" * 32
    assert _get(f"{other}/health", key) == _get(f"{url}/health", "wrong")  # unknown id: the same answer
    assert _get(f"{url}/health", key)[0] == 200
    assert _get(f"{url}/slots", key)[0] == 404  # not a gateway route
    status, text = _get(f"{url}/completion", key, {"prompt": "1, 2, 3,", "n_predict": 3})
    assert status == 200 and "content" in json.loads(text)


def test_a_client_that_hangs_up_stops_the_generation_on_the_worker(fleet: Fleet) -> None:
    ollama.Client(host=fleet.url).generate(model="gemma", prompt="Hi", options={"num_predict": 2})
    worker_server = psutil.Process(loaded(fleet)["pid"])
    conn, lines = ndjson(fleet.url, "/api/generate", {**GENERATE, "options": {**OPTIONS, "num_predict": 4000}})
    for _ in range(5):
        next(lines)
    conn.close()  # through the gateway and the agent's proxy, llama-server must see it go
    time.sleep(1.5)
    busy = worker_server.cpu_times()
    time.sleep(2.0)
    spent = sum(worker_server.cpu_times()[:2]) - sum(busy[:2])
    assert spent < 0.5, f"llama-server on the worker spent {spent:.1f} s of CPU in 2 s after its client left"
    wait_for(lambda: loaded(fleet)["in_flight"] == 0, 10, "the request gone from the gateway")


def test_a_killed_coordinator_on_the_worker_is_restarted_and_the_stream_goes_on(fleet: Fleet) -> None:
    whole, _ = stream(fleet, "/api/generate", GENERATE)
    before = loaded(fleet)
    docs, pause = stream(fleet, "/api/generate", GENERATE, 10, lambda: os.kill(before["pid"], signal.SIGKILL))
    print(f"coordinator on the worker killed after 10 pieces: paused {pause:.1f} s")
    assert "error" not in docs[-1], docs[-1]
    assert docs[-1]["done"] and docs[-1]["resumed"] == 1 and docs[-1]["eval_count"] == N
    assert text_of(docs) == text_of(whole)
    after = loaded(fleet)
    assert after["pid"] != before["pid"] and after["coordinator"] != "controller"
    assert wait_gone(before["pid"], 5)


def test_a_frozen_coordinator_worker_is_a_pause_and_frees_the_rpc_servers_it_held(fleet: Fleet) -> None:
    # A worker that stops answering without closing anything (SIGSTOP: as a cut link looks from
    # here). Its llama-server still holds the other share's rpc-server, which serves one client at
    # a time: the re-placed coordinator gets it only because the controller restarts it.
    ollama.Client(host=fleet.url).generate(model="gemma", prompt="Hi", options={"num_predict": 2})
    before = loaded(fleet)
    frozen = next(a for a in fleet.agents if a.address == before["coordinator"])
    pids = [frozen.proc.pid, before["pid"], frozen.rpc().pid]

    def freeze() -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)

    try:
        docs, pause = stream(fleet, "/api/generate", GENERATE, 10, freeze)
        print(f"the coordinator's worker frozen after 10 pieces: paused {pause:.1f} s")
        assert "error" not in docs[-1], docs[-1]
        assert docs[-1]["done"] and docs[-1]["resumed"] == 1 and docs[-1]["eval_count"] == N
        after = loaded(fleet)
        assert frozen.address not in after["nodes"] and after["coordinator"] != frozen.address
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: fleet.node(frozen.address)["state"] == "ready", 30, "the worker back")
    # Its old llama-server is a stray now: stopped once its agent reports it again.
    assert wait_gone(before["pid"], 60), "the stray was not stopped"


def test_a_lost_coordinator_worker_is_a_pause_and_the_model_goes_on_without_it(fleet: Fleet) -> None:
    ollama.Client(host=fleet.url).generate(model="gemma", prompt="Hi", options={"num_predict": 2})
    before = loaded(fleet)
    lost = next(a for a in fleet.agents if a.address == before["coordinator"])

    def kill_worker() -> None:
        lost.proc.kill()  # the agent, and with it its llama-server and rpc-server
        lost.proc.wait()

    started = time.monotonic()
    docs, pause = stream(fleet, "/api/generate", GENERATE, 10, kill_worker)
    print(f"the coordinator's worker lost after 10 pieces: paused {pause:.1f} s")
    assert "error" not in docs[-1], docs[-1]
    assert docs[-1]["done"] and docs[-1]["resumed"] == 1 and docs[-1]["eval_count"] == N
    after = loaded(fleet)
    assert lost.address not in after["nodes"] and after["coordinator"] != lost.address
    assert fleet.node(lost.address)["state"] == "unreachable"
    assert time.monotonic() - started < 90
    lost.start_again()
    wait_for(lambda: fleet.node(lost.address)["state"] == "ready", 30, "the worker back")


def test_a_restarted_controller_reloads_on_the_worker_and_stops_the_stray(fleet: Fleet) -> None:
    ollama.Client(host=fleet.url).generate(model="gemma", prompt="Hi", options={"num_predict": 2})
    before = loaded(fleet)
    fleet.stop_controller(signal.SIGKILL)
    # The agent's llama-server outlives the controller (it is the agent's child): a stray now.
    assert psutil.pid_exists(before["pid"])
    fleet.start_controller([a.address for a in fleet.agents])
    wait_for(lambda: (d := fleet.ps()) and d[0]["state"] == "ready", 90, "the model reloaded")
    assert wait_gone(before["pid"], 30), "the stray was not stopped"
    reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt=PROMPT, raw=True, options=OPTIONS)
    assert reply.done and reply.eval_count == N
    assert "coordinator.stray_stopped" in fleet.cli("events", "--json").stdout


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                    reason="a cut link needs root and iproute2 (network namespaces the test makes itself)")
def test_a_cut_link_to_the_coordinators_worker_is_a_pause_and_the_answer_goes_on(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    # Three workers, each in a network namespace of its own, routed to each other through a hub;
    # the model needs two. The coordinator's worker is cut off mid-answer: no RST, no FIN. Its
    # llama-server runs on, holding the other share's rpc-server (which serves one client at a
    # time) over a connection that only stalls: the answer goes on only because the controller
    # restarts that rpc-server, and the stray is stopped once the link is back.
    with shaped_links(3) as links, running_fleet(
            tmp_path / "fleet", llama_cpp, test_model, agents=3, agent_args=holder_stores(tmp_path, test_model, 3),
            hosts=tuple(AgentHost(link.worker_address, link.exec_prefix) for link in links)) as fleet:
        wait_for(lambda: holders_known(fleet), 60, "the plan to put the coordinator on a worker")
        whole, _ = stream(fleet, "/api/generate", GENERATE)
        before = loaded(fleet)
        victim = next(link for link in links if before["coordinator"].startswith(f"{link.worker_address}:"))
        docs, pause = stream(fleet, "/api/generate", GENERATE, 10, lambda: victim.set_up(False))
        print(f"the link to the coordinator's worker cut after 10 pieces: paused {pause:.1f} s")
        assert "error" not in docs[-1], docs[-1]
        assert docs[-1]["done"] and docs[-1]["resumed"] == 1 and docs[-1]["eval_count"] == N
        assert text_of(docs) == text_of(whole)
        assert pause < 30, "a stalled connection held the answer"
        after = loaded(fleet)
        assert before["coordinator"] not in after["nodes"] and after["coordinator"] != before["coordinator"]
        # The cut worker's llama-server never heard of any of this: a stray until its agent reports.
        assert psutil.pid_exists(before["pid"])
        victim.set_up(True)
        wait_for(lambda: fleet.node(before["coordinator"])["state"] == "ready", 60, "the worker back")
        assert wait_gone(before["pid"], 60), "the stray was not stopped"
        reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt=PROMPT, raw=True, options=OPTIONS)
        assert reply.done and reply.eval_count == N


def test_the_workers_coordinator_names_the_other_share_by_the_controllers_hashes(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    # The controller's pre-computed hashes go with StartCoordinator, written on the worker under its
    # own copy's identity; its patched llama-server then asks the other share's rpc-server for the
    # output tensor by the hash it was given instead of hashing the bytes. Proof: given a wrong one,
    # the cache misses and the rpc-server saves the bytes it is sent once more ("saved to"). The
    # other worker holds no copy, so nothing pre-stages the wrong name there.
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=2,
                       agent_args=holder_stores(tmp_path, test_model, 1)) as fleet:
        wait_for(lambda: holders_known(fleet), 60, "the plan to put the coordinator on the holder")
        ollama.Client(host=fleet.url).generate(model="gemma", prompt="Hi", options={"num_predict": 2})
        doc = loaded(fleet)
        worker, remote = fleet.agents
        assert doc["coordinator"] == worker.address and doc["backends"] == [remote.rpc_endpoint]
        [sent] = list((worker.state_dir / "coordinators").glob("*.hashes"))
        [controllers] = hash_files(fleet)
        name, offset, size = _output_entry(test_model)
        lines = sent.read_text().splitlines()
        assert lines[0] == "llama-rpc-tensor-hashes 1" and f"{offset} {size} {name}" in lines
        assert lines[1] == f"{test_model.stat().st_size} {test_model.stat().st_mtime_ns}"  # its copy links to it
        assert lines[2:] == controllers.read_text().splitlines()[2:]
        before = len(saved_lines(remote))
        controllers.write_text(controllers.read_text().replace(f" {name}\n", f" {FAKE}\n"))
        assert fleet.cli("stop", "gemma").returncode == 0
        wait_for(lambda: not fleet.ps(), 30, "gemma unloaded")
        assert not list((worker.state_dir / "coordinators").glob("*.hashes")), "left behind by the stop"
        reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt=PROMPT, raw=True, options=OPTIONS)
        assert reply.done and reply.eval_count == N
        wait_for(lambda: len(saved_lines(remote)) == before + 1, 10, "the rpc-server to save the bytes it was sent")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make test certificates")
def test_with_agent_tls_the_proxy_is_https_and_opens_only_to_the_pinned_controller(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    # The key a coordinator's requests carry goes only to the identity the controller pinned with
    # --agent-tls-ca: the agent's proxy serves its TLS certificate, and with --tls-client-ca asks
    # for the controller's, as its gRPC port does.
    (tmp_path / "pki").mkdir()
    pki = _pki(tmp_path / "pki", "IP:127.0.0.1,IP:127.0.0.2,IP:127.0.0.3")
    tls = ("--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
           "--tls-client-ca", str(pki / "ca.crt"))
    stores = holder_stores(tmp_path, test_model, 1)
    credentials = grpc.ssl_channel_credentials((pki / "ca.crt").read_bytes(), (pki / "client.key").read_bytes(),
                                               (pki / "client.crt").read_bytes())
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=2,
                       agent_args=((*stores[0], *tls), tls), agent_credentials=credentials,
                       controller_args=("--agent-tls-ca", str(pki / "ca.crt"), "--agent-tls-cert",
                                        str(pki / "client.crt"), "--agent-tls-key", str(pki / "client.key"))) as fleet:
        wait_for(lambda: holders_known(fleet), 60, "the plan to put the coordinator on the holder")
        reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt=PROMPT, raw=True, options=OPTIONS)
        assert reply.done and reply.eval_count == N
        doc = loaded(fleet)
        assert doc["coordinator"] == fleet.agents[0].address
        url = doc["url"]
        assert url.startswith("https://127.0.0.2:"), url  # the worker's --rpc-host, with its certificate
        key = coordinator_key(fleet.token_file.read_text().strip(), url.rsplit("/c/", 1)[1])
        health = f"{url}/health"
        pinned = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        # No client certificate: refused in the handshake (TLS 1.3 says so at the first read).
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            urllib.request.urlopen(urllib.request.Request(health, headers={"Authorization": f"Bearer {key}"}),
                                   timeout=10, context=pinned)
        pinned.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
        with urllib.request.urlopen(urllib.request.Request(health, headers={"Authorization": f"Bearer {key}"}),
                                    timeout=10, context=pinned) as answer:
            assert answer.status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP to the TLS port
            urllib.request.urlopen(health.replace("https://", "http://"), timeout=10)
