"""Multi-GPU nodes on the controller: GPUs matched by UUID, per-device slots, one GPU under two agents.

Statuses are built as an agent sends them (agent_pb2), with NVML data and banners that a
reordered CUDA_VISIBLE_DEVICES produces: the rpc-server's CUDA0 is not NVML's index 0.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from llamafleet.agent.convert import device_to_proto, rpc_server_to_proto
from llamafleet.agent.devices import DeviceInfo
from llamafleet.agent.gpus import check_banner, rpc_groups, visible_gpus
from llamafleet.agent.supervisor import RpcServerSnapshot, RpcState
from llamafleet.controller.cli import render_nodes, render_plan
from llamafleet.controller.coordinator import manager as manager_module
from llamafleet.controller.coordinator.manager import CoordinatorManager, assignment_doc
from llamafleet.controller.estimate import estimate_memory
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.controller.gpu_shares import COUNTED_ONCE, SPLIT_BY_LIMITS, gpu_shares
from llamafleet.controller.inventory import Inventory, NodeRecord, node_view
from llamafleet.controller.placement.filters import NEW_RPC_SERVER_GPU_BYTES, free_rpc_server
from llamafleet.controller.placement.plan import make_plan
from llamafleet.controller.planner import plan_to_json
from llamafleet.controller.models import ResolvedModel
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.fixtures.synthetic_gguf import LLAMA_8B, LLAMA_70B, write_model
from tests.unit.agent.test_gpus import banner_of

GiB, MiB = 2**30, 2**20
RUNNING, STOPPED = pb.RPC_SERVER_STATE_RUNNING, pb.RPC_SERVER_STATE_STOPPED
# NVML index → (uuid, free GiB): index 0 is nearly full, index 1 nearly empty.
GPUS = [("GPU-aaaa", 2), ("GPU-bbbb", 23)]


def nvml_devices(gpus: list[tuple[str, int]] = GPUS, limit: int = 0) -> list[pb.Device]:
    out = []
    for index, (uuid, free_gib) in enumerate(gpus):
        total, free = 24 * GiB, free_gib * GiB
        out.append(pb.Device(kind=pb.DEVICE_KIND_GPU, index=index, name="NVIDIA GeForce RTX 3090", uuid=uuid,
                             total_bytes=min(total, limit or total), free_bytes=min(free, limit or free),
                             physical_total_bytes=total, physical_free_bytes=free,
                             pci_bus_id=f"00000000:0{index + 1}:00.0"))
    return out


def banner(uuids: list[str]) -> list[pb.RpcDevice]:
    """The rpc-server's CUDA0.. for these pinned GPUs (its memory numbers are the runtime's)."""
    return [pb.RpcDevice(name=f"CUDA{i}", description="NVIDIA GeForce RTX 3090", total_bytes=24 * GiB - 300 * MiB,
                         free_bytes=24 * GiB - 300 * MiB, uuid=u) for i, u in enumerate(uuids)]


def shared_status(host: str, order: list[str], slots: int = 2) -> pb.AgentStatus:
    """Shared layout: one rpc-server per slot; CUDA_VISIBLE_DEVICES gave it the GPUs in `order`."""
    servers = [pb.RpcServerStatus(index=i, slot=i, state=RUNNING if i == 0 else STOPPED, endpoint=f"{host}:{50052 + i}",
                                  protocol_version="7.0.0", devices=banner(order) if i == 0 else [])
               for i in range(slots)]
    return pb.AgentStatus(rpc_server=servers[0], rpc_servers=servers, devices=nvml_devices(), rpc_layout="shared")


def per_device_status(host: str, order: list[str], slots: int = 2, running_slot_1: bool = False) -> pb.AgentStatus:
    """Per-device layout: slot s is rpc-servers s×n … s×n+n−1, each seeing only its GPU as CUDA0."""
    n, servers = len(order), []
    for index in range(slots * n):
        slot, position = divmod(index, n)
        running = slot == 0 or running_slot_1
        servers.append(pb.RpcServerStatus(index=index, slot=slot, state=RUNNING if running else STOPPED,
                                          endpoint=f"{host}:{50052 + index}", protocol_version="7.0.0",
                                          devices=banner([order[position]]) if running else []))
    return pb.AgentStatus(rpc_server=servers[0], rpc_servers=servers, devices=nvml_devices(), rpc_layout="per-device")


# ---- matching by UUID -------------------------------------------------------------------------

def test_a_reordered_cuda_device_gets_the_memory_of_its_own_gpu() -> None:
    # CUDA_VISIBLE_DEVICES=1,0: the rpc-server's CUDA0 is NVML's index 1 (the empty one).
    view = node_view("10.0.0.5:50051", "ready", shared_status("10.0.0.5", ["GPU-bbbb", "GPU-aaaa"]))
    assert [(d.name, d.uuid, d.free_bytes // GiB) for d in view.devices] == [("CUDA0", "GPU-bbbb", 23),
                                                                            ("CUDA1", "GPU-aaaa", 2)]


def test_an_agent_from_before_the_pin_is_still_matched_by_index() -> None:
    status = shared_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"])
    status.rpc_layout = ""
    for device in status.rpc_server.devices:
        device.uuid = ""
    view = node_view("10.0.0.5:50051", "ready", status)
    assert [(d.name, d.free_bytes // GiB) for d in view.devices] == [("CUDA0", 2), ("CUDA1", 23)]


def test_a_per_device_node_lists_every_gpu_with_the_rpc_server_that_serves_it() -> None:
    view = node_view("10.0.0.5:50051", "ready", per_device_status("10.0.0.5", ["GPU-bbbb", "GPU-aaaa"]))
    assert [(d.name, d.uuid, d.server) for d in view.devices] == [("CUDA0", "GPU-bbbb", 0), ("CUDA0", "GPU-aaaa", 1)]
    assert view.rpc_state == "running"
    assert [s.model_slot for s in view.rpc_servers] == [0, 0, 1, 1]


def test_a_per_device_node_is_not_running_while_one_of_its_gpus_rpc_servers_is_not() -> None:
    status = per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"])
    status.rpc_servers[1].state = pb.RPC_SERVER_STATE_FAILED
    assert node_view("10.0.0.5:50051", "ready", status).rpc_state == "failed"


# ---- placement over the GPUs of a node and across nodes ---------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {s.name: write_model(folder / f"{s.name}.gguf", s) for s in (LLAMA_8B, LLAMA_70B)}


def test_per_device_placement_names_one_endpoint_per_gpu_in_rpc_order(models: dict[str, Path]) -> None:
    header = read_gguf_header(models[LLAMA_70B.name])
    both_free = [("GPU-aaaa", 23), ("GPU-bbbb", 23)]
    status = per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"])
    del status.devices[:]
    status.devices.extend(nvml_devices(both_free))
    plan = make_plan("70b", estimate_memory(header, 2048), [node_view("10.0.0.5:50051", "ready", status)], "7.0.0")
    assert plan.fits
    assert [(a.endpoint, a.device, a.rpc_index, a.uuid) for a in plan.assignments] == [
        ("10.0.0.5:50052", "CUDA0", 0, "GPU-aaaa"), ("10.0.0.5:50053", "CUDA0", 1, "GPU-bbbb")]
    assert plan.backends == ["10.0.0.5:50052", "10.0.0.5:50053"] and len(plan.tensor_split) == 2


def test_a_busy_per_device_slot_moves_the_next_model_to_the_next_slot_and_books_its_contexts() -> None:
    view = node_view("10.0.0.5:50051", "ready", per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"]))
    [chosen] = free_rpc_server({"10.0.0.5:50053": "llama3"})([view]).survivors
    assert (chosen.endpoint, chosen.rpc_index) == ("10.0.0.5:50054", 2)
    assert [chosen.server_of(d) for d in chosen.devices] == [("10.0.0.5:50054", 2), ("10.0.0.5:50055", 3)]
    assert [v.free_bytes - c.free_bytes for v, c in zip(view.devices, chosen.devices, strict=True)] == [
        NEW_RPC_SERVER_GPU_BYTES] * 2


def test_shared_layout_splits_over_both_gpus_of_one_node_before_a_second_node(models: dict[str, Path]) -> None:
    header = read_gguf_header(models[LLAMA_70B.name])
    big = shared_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"])
    del big.devices[:]
    big.devices.extend(nvml_devices([("GPU-aaaa", 23), ("GPU-bbbb", 23)]))
    small = shared_status("10.0.0.6", ["GPU-cccc"])
    del small.devices[:]
    small.devices.extend(nvml_devices([("GPU-cccc", 23)]))
    nodes = [node_view("10.0.0.6:50051", "ready", small), node_view("10.0.0.5:50051", "ready", big)]
    plan = make_plan("70b", estimate_memory(header, 2048), nodes, "7.0.0")
    assert [(a.node, a.device) for a in plan.assignments] == [("10.0.0.5:50051", "CUDA0"), ("10.0.0.5:50051", "CUDA1")]
    assert plan.backends == ["10.0.0.5:50052"]
    assert plan.excluded == {"10.0.0.6:50051": "not needed: fewer backends hold the model"}
    # A longer context needs the second node too: fewest nodes first, then across nodes.
    wide = make_plan("70b", estimate_memory(header, 32768), nodes, "7.0.0")
    assert wide.fits and {a.node for a in wide.assignments} == {"10.0.0.5:50051", "10.0.0.6:50051"}
    assert len(wide.tensor_split) == 3


def test_plan_text_shows_node_and_device(models: dict[str, Path], tmp_path: Path) -> None:
    header = read_gguf_header(models[LLAMA_8B.name])
    view = node_view("10.0.0.5:50051", "ready", per_device_status("10.0.0.5", ["GPU-bbbb", "GPU-aaaa"]))
    plan = make_plan("8b", estimate_memory(header, 2048), [view], "7.0.0")
    resolved = ResolvedModel("8b", models[LLAMA_8B.name], "models-dir")
    text = render_plan(plan_to_json(resolved, plan, [], "7.0.0"))
    assert "node 10.0.0.5:50051 device CUDA0 (GPU-bbbb) via 10.0.0.5:50052" in text


# ---- one GPU under two agents -----------------------------------------------------------------

def two_agents(limit_a: int, limit_b: int) -> dict[str, pb.AgentStatus]:
    gpu = [("GPU-same", 20)]
    return {"10.0.0.5:50051": pb.AgentStatus(devices=nvml_devices(gpu, limit_a)),
            "10.0.0.5:50061": pb.AgentStatus(devices=nvml_devices(gpu, limit_b))}


def test_two_agents_on_one_gpu_without_limits_count_it_once() -> None:
    shares = gpu_shares(two_agents(0, 0))
    a, b = shares["10.0.0.5:50051"]["GPU-same"], shares["10.0.0.5:50061"]["GPU-same"]
    assert a.total_bytes + b.total_bytes == 24 * GiB and a.free_bytes + b.free_bytes == 20 * GiB
    assert a.how == COUNTED_ONCE and a.shared_with == ("10.0.0.5:50061",)


def test_limits_that_split_the_gpu_already_are_kept() -> None:
    shares = gpu_shares(two_agents(8 * GiB, 16 * GiB))
    assert shares["10.0.0.5:50051"]["GPU-same"].total_bytes == 8 * GiB
    assert shares["10.0.0.5:50061"]["GPU-same"].how == SPLIT_BY_LIMITS


def test_limits_that_overcommit_the_gpu_are_scaled_to_it() -> None:
    shares = gpu_shares(two_agents(16 * GiB, 16 * GiB))
    assert {s["GPU-same"].total_bytes for s in shares.values()} == {12 * GiB}


def test_a_gpu_only_one_agent_reports_has_no_share_and_placement_sees_the_share() -> None:
    statuses = two_agents(0, 0)
    statuses["10.0.0.7:50051"] = pb.AgentStatus(devices=nvml_devices([("GPU-own", 20)]))
    shares = gpu_shares(statuses)
    assert "10.0.0.7:50051" not in shares
    status = shared_status("10.0.0.5", ["GPU-same"])
    del status.devices[:]
    status.devices.extend(statuses["10.0.0.5:50051"].devices)
    view = node_view("10.0.0.5:50051", "ready", status, shares=shares["10.0.0.5:50051"])
    assert [(d.total_bytes, d.free_bytes) for d in view.devices] == [(12 * GiB, 10 * GiB)]


# ---- from the agent's NVML view to the plan: 2 and 4 GPUs, CUDA_VISIBLE_DEVICES reordered -----
# The statuses below are made by the agent's own code from fake NVML data: which GPUs each
# rpc-server of slot 0 is pinned to (agent/gpus.py), the banner each prints for them (checked as
# the agent checks it) and the wire conversion (agent/convert.py). NVML's index order is not bus
# order (index 0 sits on bus 41), and each GPU has its own free memory, so a device matched to
# the wrong GPU shows in its numbers.

BUSES = ["41", "01", "81", "C1"]
RTX_3090 = "NVIDIA GeForce RTX 3090"


def nvml_host(free_gib: list[int]) -> list[DeviceInfo]:
    return [DeviceInfo("gpu", i, RTX_3090, f"GPU-{i}-bus{BUSES[i]}", 24 * GiB, free * GiB, (24 - free) * GiB,
                       pci_bus_id=f"00000000:{BUSES[i]}:00.0") for i, free in enumerate(free_gib)]


def reported(host: str, nvml: list[DeviceInfo], layout: str, cuda_visible: str | None,
             slots: int = 2) -> pb.AgentStatus:
    groups = rpc_groups(layout, visible_gpus(nvml, cuda_visible, "PCI_BUS_ID"), ())
    servers = []
    for index in range(slots * len(groups)):
        group, slot, endpoint = groups[index % len(groups)], index // len(groups), f"{host}:{50052 + index}"
        snap = RpcServerSnapshot(RpcState.STOPPED, index=index, slot=slot, endpoint=endpoint)
        if slot == 0:
            banner = tuple(banner_of(list(group.gpus)))
            assert check_banner(banner, group.gpus) == ""
            snap = RpcServerSnapshot(RpcState.RUNNING, index=index, slot=slot, endpoint=endpoint,
                                     protocol_version="7.0.0", devices=banner,
                                     gpu_ids=tuple((g.uuid, g.pci_bus_id) for g in group.gpus))
        servers.append(rpc_server_to_proto(snap))
    return pb.AgentStatus(rpc_server=servers[0], rpc_servers=servers, devices=[device_to_proto(d) for d in nvml],
                          rpc_layout=layout)


# CUDA_VISIBLE_DEVICES in PCI order: 2,0,3,1 is buses 81, 01, C1, 41 = NVML indices 2, 1, 3, 0.
FOUR = ([6, 20, 14, 18], "2,0,3,1", [("GPU-2-bus81", 14), ("GPU-1-bus01", 20), ("GPU-3-busC1", 18),
                                      ("GPU-0-bus41", 6)])
# 1,0 on two GPUs: bus 41 first (NVML index 0), then bus 01.
TWO = ([20, 6], "1,0", [("GPU-0-bus41", 20), ("GPU-1-bus01", 6)])


@pytest.mark.parametrize("layout", ["shared", "per-device"])
@pytest.mark.parametrize(("free", "visible", "expected"), [TWO, FOUR], ids=["2-gpus", "4-gpus"])
def test_reordered_gpus_keep_their_own_memory_in_either_layout(layout: str, free: list[int], visible: str,
                                                               expected: list[tuple[str, int]]) -> None:
    view = node_view("10.0.0.5:50051", "ready", reported("10.0.0.5", nvml_host(free), layout, visible))
    assert [(d.uuid, d.free_bytes // GiB) for d in view.devices] == expected
    if layout == "shared":
        assert [d.name for d in view.devices] == [f"CUDA{i}" for i in range(len(free))]
        assert {d.server for d in view.devices} == {0}
    else:  # each process sees only its own GPU, as its CUDA0
        assert [(d.name, d.server) for d in view.devices] == [("CUDA0", i) for i in range(len(free))]


@pytest.mark.parametrize("layout", ["shared", "per-device"])
def test_a_plan_over_four_reordered_gpus_names_node_device_and_gpu_in_text_and_json(
        layout: str, models: dict[str, Path]) -> None:
    header = read_gguf_header(models[LLAMA_70B.name])
    free, visible, expected = FOUR
    view = node_view("10.0.0.5:50051", "ready", reported("10.0.0.5", nvml_host(free), layout, visible))
    plan = make_plan("70b", estimate_memory(header, 2048), [view], "7.0.0")
    assert plan.fits
    resolved = ResolvedModel("70b", models[LLAMA_70B.name], "models-dir")
    doc = plan_to_json(resolved, plan, [], "7.0.0")
    shared = layout == "shared"
    endpoints = ["10.0.0.5:50052"] * 4 if shared else [f"10.0.0.5:{50052 + i}" for i in range(4)]
    names = [f"CUDA{i}" for i in range(4)] if shared else ["CUDA0"] * 4
    assert [(a["node"], a["device"], a["uuid"], a["endpoint"], a["rpc_index"]) for a in doc["assignments"]] == [
        ("10.0.0.5:50051", name, uuid, endpoint, 0 if shared else i)
        for i, (name, (uuid, _), endpoint) in enumerate(zip(names, expected, endpoints, strict=True))]
    assert doc["backends"] == list(dict.fromkeys(endpoints)) and len(doc["tensor_split"]) == 4
    # `ps --json` and the placement event name the GPU of each share too.
    assert [assignment_doc(a)["uuid"] for a in plan.assignments] == [uuid for uuid, _ in expected]
    # Layers follow each GPU's own room: the 20 GiB one gets the most, the 6 GiB one (last, with
    # the output layer) the fewest.
    counts = [a["layer_count"] for a in doc["assignments"]]
    assert counts[1] == max(counts) and counts[3] == min(counts) and sum(counts) == LLAMA_70B.n_layers
    text = render_plan(json.loads(json.dumps(doc)))  # as `llamafleet plan` gets it over HTTP
    for name, (uuid, _), endpoint in zip(names, expected, endpoints, strict=True):
        assert f"node 10.0.0.5:50051 device {name} ({uuid}) via {endpoint}: " in text


def test_fewest_nodes_first_across_the_gpus_of_one_node_then_across_nodes(models: dict[str, Path]) -> None:
    # A 4-GPU box of small free memory and two 2-GPU boxes with more each (per-device layout).
    four = node_view("10.0.0.5:50051", "ready", reported("10.0.0.5", nvml_host([10, 10, 10, 10]), "per-device", None))
    two_a = node_view("10.0.0.6:50051", "ready", reported("10.0.0.6", nvml_host([22, 22]), "per-device", None))
    two_b = node_view("10.0.0.7:50051", "ready", reported("10.0.0.7", nvml_host([21, 21]), "per-device", None))
    nodes = [four, two_a, two_b]
    header = read_gguf_header(models[LLAMA_70B.name])
    # 37 GiB of weights: one node, its two GPUs (the one of the three with the most room).
    one = make_plan("70b", estimate_memory(header, 2048), nodes, "7.0.0")
    assert one.fits and [(a.node, a.endpoint) for a in one.assignments] == [
        ("10.0.0.6:50051", "10.0.0.6:50052"), ("10.0.0.6:50051", "10.0.0.6:50053")]
    # A context that needs more than that: two nodes (both 2-GPU ones, the most room), never three.
    two = make_plan("70b", estimate_memory(header, 32768), nodes, "7.0.0")
    assert two.fits and {a.node for a in two.assignments} == {"10.0.0.6:50051", "10.0.0.7:50051"}
    assert len(two.assignments) == 4 and two.excluded["10.0.0.5:50051"].startswith("not needed")
    # The node with the most room goes last (it holds the output layer), its GPUs in their order.
    assert [a.endpoint for a in two.assignments][-2:] == ["10.0.0.6:50052", "10.0.0.6:50053"]


def test_a_slot_cut_short_is_never_offered() -> None:
    # Slots 0 and 1 are busy; slot 2 lost its second rpc-server (a list agent_bounds cut, which
    # the node's error says): placing a 2-GPU share on its one process would send both GPUs'
    # layers to a server that has one of them.
    status = per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"], slots=3, running_slot_1=True)
    del status.rpc_servers[5]
    view = node_view("10.0.0.5:50051", "ready", status)
    busy = {"10.0.0.5:50052": "a", "10.0.0.5:50054": "b"}
    result = free_rpc_server(busy)([view])
    assert result.survivors == [] and "no free rpc-server" in result.dropped["10.0.0.5:50051"]
    # With all of slot 2 there, it is the one chosen.
    whole = node_view("10.0.0.5:50051", "ready", per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"], slots=3,
                                                                    running_slot_1=True))
    [chosen] = free_rpc_server(busy)([whole]).survivors
    assert chosen.slot_servers == (("10.0.0.5:50056", 4), ("10.0.0.5:50057", 5))


def test_a_staging_request_names_every_rpc_server_and_the_first_for_older_agents() -> None:
    sent: list[pb.StageTensorsRequest] = []

    async def call(address: str, method: str, request: pb.StageTensorsRequest, timeout_s: float) -> pb.StageTensorsResponse:
        sent.append(request)
        return pb.StageTensorsResponse()

    inventory = Inventory(cast(Any, None), cast(Any, None), 1.0, 3.0)
    inventory._call = call  # type: ignore[method-assign,assignment]
    asyncio.run(inventory.stage_tensors("10.0.0.5:50051", "ab" * 32, [(0, 2**30)], 60.0, [3, 2]))
    asyncio.run(inventory.stage_tensors("10.0.0.5:50051", "ab" * 32, [(0, 2**30)], 60.0))
    assert (sent[0].rpc_server_index, list(sent[0].rpc_server_indexes)) == (2, [2, 3])
    assert not sent[1].HasField("rpc_server_index") and list(sent[1].rpc_server_indexes) == []


def test_nodes_says_which_agents_share_a_gpu_and_how_it_is_split() -> None:
    inventory = Inventory(cast(Any, None), cast(Any, None), 1.0, 3.0, clock=lambda: 100.0)
    for address, limit in (("10.0.0.5:50051", 16 * GiB), ("10.0.0.5:50061", 16 * GiB), ("10.0.0.7:50051", 0)):
        uuid = "GPU-own" if address.startswith("10.0.0.7") else "GPU-same"
        status = shared_status(address.split(":")[0], [uuid])
        del status.devices[:]
        status.devices.extend(nvml_devices([(uuid, 20)], limit))
        inventory._nodes[address] = NodeRecord(address, status=status, last_heartbeat=100.0)
    docs = json.loads(json.dumps(inventory.describe()))  # as `llamafleet nodes` gets them over HTTP
    [a, b, alone] = docs
    assert [s["shared_with"] for s in a["gpu_shares"]] == [["10.0.0.5:50061"]] and alone["gpu_shares"] == []
    assert (b["gpu_shares"][0]["how"], b["gpu_shares"][0]["total_bytes"]) == (COUNTED_ONCE, 12 * GiB)
    text = "\n".join(render_nodes(docs))
    assert ("GPU-same is also advertised by 10.0.0.5:50061: counted once: over-advertised, shared in proportion; "
            "placement counts 12.0 GiB of its 24.0 GiB here (10.0 GiB free)") in text
    assert "GPU-same is also advertised by 10.0.0.5:50051: counted once" in text
    assert "GPU-own is also" not in text


def test_an_unloaded_model_stops_only_rpc_servers_past_the_agents_own_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    # Per-device, 2 GPUs: slot 0 is #0 and #1 (the agent's own, started with it), slot 1 #2 and
    # #3. Stopping #1 would leave slot 0 half running: the node's rpc-server counts as not
    # running and placement drops the whole node.
    monkeypatch.setattr(manager_module, "RPC_SERVER_IDLE_STOP_S", 0.0)
    monkeypatch.setattr(manager_module, "RPC_SERVER_REPORT_S", 0.0)
    inventory = Inventory(cast(Any, None), cast(Any, None), 1.0, 3.0, clock=lambda: 100.0)
    node = "10.0.0.5:50051"
    status = per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"], running_slot_1=True)
    inventory._nodes[node] = NodeRecord(node, status=status, last_heartbeat=100.0)
    stopped: list[int] = []

    async def set_rpc_server(address: str, index: int, running: bool, timeout_s: float = 45.0) -> pb.RpcServerStatus:
        stopped.append(index)
        return pb.RpcServerStatus(index=index, state=STOPPED)

    inventory.set_rpc_server = set_rpc_server  # type: ignore[method-assign]
    runtime = SimpleNamespace(events=lambda *args, **data: None)
    made = CoordinatorManager(cast(Any, None), inventory, cast(Any, None), cast(Any, runtime), 300.0)

    async def release_both_slots() -> None:
        made._stop_later({(node, i, f"10.0.0.5:{50052 + i}") for i in range(4)}, "m")
        await asyncio.gather(*made._idle_stops)

    asyncio.run(release_both_slots())
    assert sorted(stopped) == [2, 3]
    assert inventory.model_slot(node, 1) == 0 and inventory.model_slot(node, 2) == 1


def test_a_loaded_model_reserves_each_gpu_of_a_per_device_node_only_its_own_share(models: dict[str, Path]) -> None:
    # Per-device, every GPU is its own process's CUDA0: reservations keyed by that name alone
    # put both GPUs' bytes on each, and a second model that fits was refused.
    header = read_gguf_header(models[LLAMA_70B.name])
    status = per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"], running_slot_1=True)
    del status.devices[:]
    status.devices.extend(nvml_devices([("GPU-aaaa", 23), ("GPU-bbbb", 23)]))
    view = node_view("10.0.0.5:50051", "ready", status)
    first = make_plan("70b", estimate_memory(header, 2048), [view], "7.0.0")
    assert [a.uuid for a in first.assignments] == ["GPU-aaaa", "GPU-bbbb"]
    made = CoordinatorManager(cast(Any, None), cast(Any, None), cast(Any, None), cast(Any, None), 300.0)
    made._plans["70b"] = first
    reserved, _, busy = made._reserved(excluding="8b")
    left = view.reserving(reserved)
    assert [d.total_bytes - d.free_bytes for d in left.devices] == [a.total_bytes for a in first.assignments]
    # So the 8B fits beside it, on the node's second slot.
    second = make_plan("8b", estimate_memory(read_gguf_header(models[LLAMA_8B.name]), 2048), [left], "7.0.0",
                       busy=busy)
    assert second.fits and second.backends == ["10.0.0.5:50054", "10.0.0.5:50055"], second.reason


def test_a_gpu_identity_mismatch_is_the_nodes_error_in_plan_and_nodes(models: dict[str, Path]) -> None:
    # The agent stopped #1 (slot 0's second GPU) as failed: its banner was not the pinned GPU.
    why = ("GPU identity: the rpc-server's CUDA0 is a NVIDIA GeForce RTX 4090, but the agent gave it GPU-bbbb "
           "(bus 00000000:02:00.0: NVIDIA GeForce RTX 3090)")
    status = per_device_status("10.0.0.5", ["GPU-aaaa", "GPU-bbbb"])
    status.rpc_servers[1].state = pb.RPC_SERVER_STATE_FAILED
    status.rpc_servers[1].last_exit = why
    plan = make_plan("8b", estimate_memory(read_gguf_header(models[LLAMA_8B.name]), 2048),
                     [node_view("10.0.0.5:50051", "ready", status)], "7.0.0")
    assert not plan.fits and plan.excluded == {"10.0.0.5:50051": f"rpc-server is failed (rpc-server 10.0.0.5:50053: {why})"}
    inventory = Inventory(cast(Any, None), cast(Any, None), 1.0, 3.0, clock=lambda: 100.0)
    inventory._nodes["10.0.0.5:50051"] = NodeRecord("10.0.0.5:50051", status=status, last_heartbeat=100.0)
    text = "\n".join(render_nodes(json.loads(json.dumps(inventory.describe()))))
    assert f"rpc-server #1 failed 10.0.0.5:50053: {why}" in text
