"""Endpoints that are not honest agents, added to a real controller over its API.

A recording listener must receive no token at all; an agent that lies in its status must be
clamped or refused with the reason in `llamafleet nodes`, and never get a model placed on an
endpoint outside the address the operator gave for it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import wait_for
from tests.integration.controller.fakes import lying_agent, recording_listener
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
FLEET_TOKEN = "the-fleet-wide-token"


def test_an_address_added_over_the_api_is_sent_no_token(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    # Where a controller used to find its fleet token by default, and sent it to every address.
    (state / "agent-token").write_text(FLEET_TOKEN + "\n")
    fleet = Fleet(None, f"http://127.0.0.1:{free_loopback_port()}", [], tmp_path / "unused", state, models,
                  tmp_path / "controller.log", llama_cpp, 0.3, shared_token=False)
    fleet.start_controller([])
    try:
        with recording_listener("127.0.0.11") as (address, recorder):
            request = urllib.request.Request(f"{fleet.url}/llamafleet/v1/nodes", method="POST",
                                             data=json.dumps({"address": address}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert reply.status == 201
            time.sleep(3.0)  # ten heartbeat intervals: the watcher has dialled (or not) by now
            sent = [value for _, metadata in recorder.calls for key, value in metadata if key == "authorization"]
            assert sent == [], f"the controller sent credentials to an unpinned endpoint: {sent}"
            assert FLEET_TOKEN not in repr(recorder.calls)
            node = fleet.node(address)
            assert node["state"] == "unreachable" and node["error"].startswith("no credential for this node")
    finally:
        fleet.stop_controller()


def hostile_status(endpoint: str, protocol: str, *, free: int, total: int, devices: int = 1,
                   hostname: str = "evil") -> pb.AgentStatus:
    return pb.AgentStatus(
        node=pb.NodeIdentity(node_id="evil", hostname=hostname, agent_version="0.1.0"),
        build=pb.LlamaCppBuild(rpc_protocol_version=protocol, backends=["CPU", "RPC"]),
        rpc_server=pb.RpcServerStatus(state=pb.RPC_SERVER_STATE_RUNNING, endpoint=endpoint, protocol_version=protocol,
                                      generation=1, devices=[pb.RpcDevice(name="CPU", total_bytes=total,
                                                                          free_bytes=free)] * devices),
        devices=[pb.Device(kind=pb.DEVICE_KIND_CPU, name="CPU", total_bytes=total, free_bytes=free)],
        host=pb.HostMemory(total_bytes=total, available_bytes=free))


def test_lying_agents_are_clamped_or_refused_and_never_used_elsewhere(tmp_path: Path, llama_cpp: Manifest,
                                                                      test_model: Path) -> None:
    protocol = llama_cpp.rpc_protocol_version
    # Reports an rpc-server on another host, with an exabyte free: the coordinator would send the
    # model's tensors there.
    elsewhere = hostile_status("8.8.8.8:50052", protocol, free=10**18, total=10**18)
    # On its own host, but absurd: 10,000 devices, a 1 MB hostname, more free than total.
    absurd = hostile_status("127.0.0.13:50052", protocol, free=2**40, total=2**30, devices=10_000,
                            hostname="h" * 2**20)
    with running_fleet(tmp_path, llama_cpp, test_model, agents=0) as fleet, \
            lying_agent("127.0.0.12", elsewhere) as liar, lying_agent("127.0.0.13", absurd) as braggart:
        for address in (liar, braggart):
            assert fleet.cli("node", "add", address).returncode == 0
        wait_for(lambda: all(n["state"] == "ready" for n in fleet.nodes()) and len(fleet.nodes()) == 2, 20,
                 "both fakes reporting")
        assert fleet.controller is not None and fleet.controller.poll() is None
        liar_node, braggart_node = fleet.node(liar), fleet.node(braggart)
        assert liar_node["error"].startswith("agent status refused: rpc endpoint 8.8.8.8:50052 is not on "
                                             "127.0.0.12, the node's address"), liar_node["error"]
        assert liar_node["rpc_server"]["endpoint"] == "" and liar_node["rpc_server"]["state"] == "failed"
        assert braggart_node["error"].startswith("agent status clamped:")
        assert "10000 reported, kept 64" in braggart_node["error"]
        assert len(braggart_node["rpc_server"]["devices"]) == 64 and len(braggart_node["node"]["hostname"]) == 256
        assert all(d["free_bytes"] <= d["total_bytes"] for d in braggart_node["devices"])
        listing = fleet.cli("nodes")
        assert listing.returncode == 0 and "8.8.8.8:50052 is not on 127.0.0.12" in listing.stdout

        plan = json.loads(fleet.cli("plan", "gemma", "--json").stdout)
        assert "8.8.8.8:50052" not in plan["backends"] and "rpc-server is failed" in plan["excluded"][liar]
        assert all(backend.startswith("127.0.0.13:") for backend in plan["backends"])
        time.sleep(1.0)
        assert fleet.controller.poll() is None, "the controller died of a lying agent"
        assert "Traceback" not in fleet.log_path.read_text()
