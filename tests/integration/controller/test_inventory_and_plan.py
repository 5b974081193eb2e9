"""`llamafleet serve` over real agents: inventory, heartbeats, maintenance, persistence, plans."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import running_fleet

pytestmark = pytest.mark.integration


def test_nodes_json_shows_every_agent_with_its_status(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model) as fleet:
        docs = fleet.nodes()
        assert [d["address"] for d in docs] == sorted(a.address for a in fleet.agents)
        for doc, agent in zip(docs, sorted(fleet.agents, key=lambda a: a.address)):
            assert doc["state"] == "ready" and doc["error"] == ""
            assert doc["rpc_server"]["state"] == "running" and doc["rpc_server"]["endpoint"] == agent.rpc_endpoint
            assert doc["rpc_server"]["protocol_version"] == llama_cpp.rpc_protocol_version
            assert doc["build"]["rpc_protocol_version"] == llama_cpp.rpc_protocol_version
            assert doc["build"]["commit"] == (llama_cpp.commit or "")
            cpu = doc["devices"][-1]
            assert cpu["name"] == "CPU" and cpu["total_bytes"] == 260 * 2**20
        table = fleet.cli("nodes")
        assert table.returncode == 0 and "ready" in table.stdout and "CPU: 260.0 MiB free" in table.stdout


def test_plan_spreads_the_model_over_workers_smaller_than_it(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model) as fleet:
        result = fleet.cli("plan", "gemma", "--ctx", "2048", "--json")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert plan["fits"] and len(plan["backends"]) == 2
        assert set(plan["backends"]) == {a.rpc_endpoint for a in fleet.agents}
        assert sum(plan["tensor_split"]) == plan["estimate"]["n_layers"] + 1
        assert all(a["total_bytes"] <= a["usable_bytes"] for a in plan["assignments"])
        assert plan["coordinator_rpc_protocol"] == llama_cpp.rpc_protocol_version and plan["warnings"] == []
        text = fleet.cli("plan", "gemma", "--ctx", "2048")
        assert "fits on 2 backend(s)" in text.stdout and "--tensor-split" in text.stdout
        assert plan["route"]["target"] == "fleet" and "route: fleet: placed across the fleet" in text.stdout


def test_does_not_fit_exits_3_and_says_what_would(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model) as fleet:
        result = fleet.cli("plan", "gemma", "--ctx", "500000")
        assert result.returncode == 3
        assert "does not fit" in result.stdout and "a context of at most" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "nothing-here"], "model 'nothing-here' not found"),
        (["plan", "../../etc/passwd"], "invalid model name"),
        (["plan", "gemma", "--ctx", "-5"], "ctx must be between 1 and"),
        (["node", "add", "not-an-address"], "invalid agent address"),
        (["node", "remove", "10.9.9.9:1"], "no node 10.9.9.9:1"),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path: Path, llama_cpp: Manifest, test_model: Path,
                                          args: list[str], message: str) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=1) as fleet:
        result = fleet.cli(*args)
        assert result.returncode == 1
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.stderr


def test_stopped_agent_becomes_unreachable_within_the_grace_and_ready_again(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model) as fleet:
        victim = fleet.agents[0]
        victim.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            wait_for(lambda: fleet.node(victim.address)["state"] == "unreachable", 5, "unreachable")
            took = time.monotonic() - stopped_at
            print(f"marked unreachable after {took:.2f} s (grace {3 * fleet.heartbeat_s:.1f} s)")
            assert took >= 3 * fleet.heartbeat_s - 0.35
            plan = json.loads(fleet.cli("plan", "gemma", "--ctx", "2048", "--json").stdout)
            assert plan["excluded"][victim.address] == "node is unreachable"
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: fleet.node(victim.address)["state"] == "ready", 5, "ready again")


def test_maintenance_drains_and_survives_a_controller_restart(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model) as fleet:
        drained = fleet.agents[1].address
        assert fleet.cli("node", "maintenance", drained).returncode == 0
        plan = json.loads(fleet.cli("plan", "gemma", "--ctx", "1024", "--json").stdout)
        assert plan["excluded"][drained].startswith("in maintenance")
        fleet.stop_controller(signal.SIGKILL)
        fleet.start_controller([])  # no --agent flags: membership comes from SQLite
        wait_for(lambda: {n["address"]: n["state"] for n in fleet.nodes()}
                 == {fleet.agents[0].address: "ready", drained: "maintenance"}, 10, "state restored")
        assert fleet.cli("node", "maintenance", drained, "--off").returncode == 0
        wait_for(lambda: fleet.node(drained)["state"] == "ready", 5, "back in service")


def test_node_add_and_remove(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model) as fleet:
        gone = fleet.agents[0].address
        assert fleet.cli("node", "remove", gone).returncode == 0
        assert gone not in [n["address"] for n in fleet.nodes()]
        added = fleet.cli("node", "add", gone)
        assert added.returncode == 0 and "added" in added.stdout
        wait_for(lambda: fleet.node(gone)["state"] == "ready", 10, "re-added node ready")
        assert "already a node" in fleet.cli("node", "add", gone).stdout


def test_wrong_token_shows_as_unreachable_with_the_cause(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=1) as fleet:
        fleet.stop_controller()
        fleet.token_file.write_text("not-the-token\n")
        fleet.start_controller([])
        time.sleep(1.0)
        node = fleet.nodes()[0]
        assert node["state"] == "unreachable" and "refused the token" in node["error"]
        assert "not-the-token" not in json.dumps(fleet.nodes()) and "fleet-token" not in fleet.log_path.read_text()
