"""Where the coordinator runs (controller/placement/coordinator.py) and the plan that moves its share
(first for a CPU, last for GPUs)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from llamafleet.controller.estimate import estimate_memory
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.controller.placement.coordinator import choose_coordinator
from llamafleet.controller.planner import Planner
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.controller.placement.nodes import DeviceView, NodeView
from llamafleet.controller.placement.plan import DeviceAssignment, Headroom, Plan, with_coordinator_share
from tests.fixtures.synthetic_gguf import LLAMA_70B, write_model
from tests.unit.controller.test_placement import _plan, assert_consistent

GiB = 2**30


def _share(node: str, device: str, first: int, count: int, size: int, uuid: str = "") -> DeviceAssignment:
    return DeviceAssignment(node=node, endpoint=f"{node}-rpc", device=device, first_layer=first, layer_count=count,
                            weight_bytes=size, kv_bytes=0, output_bytes=0, compute_bytes=0, usable_bytes=size,
                            uuid=uuid)


PLAN = Plan("m", None, True, [_share("a", "CPU", 0, 10, 10 * GiB), _share("b", "CPU", 10, 20, 20 * GiB),  # type: ignore[arg-type]
                              _share("c", "CUDA0", 30, 2, 2 * GiB, uuid="GPU-c")],
            holders=["a", "b", "c"])


def test_the_worker_with_the_largest_share_runs_it_and_each_other_node_says_why_not() -> None:
    choice = choose_coordinator(PLAN, "auto", {"a": "", "b": "", "c": ""})
    assert choice.node == "b" and "largest share" in choice.reason and not choice.refused
    # b cannot: the next largest that can.
    choice = choose_coordinator(PLAN, "auto", {"a": "", "b": "runs no coordinators", "c": ""})
    assert choice.node == "a"
    # Nobody holds the file: here, with every node's reason.
    nobody = Plan("m", None, True, PLAN.assignments, holders=[])  # type: ignore[arg-type]
    choice = choose_coordinator(nobody, "auto", {})
    assert choice.node == "" and "a does not hold the model's file" in choice.reason and not choice.refused


def test_pins_controller_worker_and_a_node() -> None:
    assert choose_coordinator(PLAN, "controller", {"b": ""}).node == ""
    nobody = Plan("m", None, True, PLAN.assignments, holders=[])  # type: ignore[arg-type]
    refused = choose_coordinator(nobody, "worker", {})
    assert refused.refused and "no node of the plan can run the coordinator" in refused.reason
    assert choose_coordinator(PLAN, "c", {"c": ""}).node == "c"
    not_in_plan = choose_coordinator(PLAN, "z:1", {})
    assert not_in_plan.refused and "holds no share" in not_in_plan.reason
    unable = choose_coordinator(PLAN, "a", {"a": "has no llama.cpp build"})
    assert unable.refused and "has no llama.cpp build" in unable.reason


def test_a_share_that_cannot_be_pinned_or_mixes_devices_is_not_taken() -> None:
    mixed = Plan("m", None, True, [_share("a", "CUDA0", 0, 5, GiB, "GPU-1"), _share("a", "CPU", 5, 25, 30 * GiB),  # type: ignore[arg-type]
                                   _share("b", "CUDA0", 30, 2, GiB)], holders=["a", "b"])
    choice = choose_coordinator(mixed, "auto", {"a": "", "b": ""})
    assert choice.node == "" and "mixes GPUs and the CPU" in choice.reason and "no UUID" in choice.reason


@pytest.fixture(scope="module")
def model70(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("models") / "llama70.gguf", LLAMA_70B)


def _cpu_node(i: int, free_gib: int) -> NodeView:
    return NodeView(f"10.0.0.{i}:50051", "ready", "running", f"10.0.0.{i}:50052", "7.0.0",
                    (DeviceView("CPU", 64 * GiB, free_gib * GiB),))


def test_the_coordinators_node_leads_the_layer_order_and_the_split_is_still_exact(model70: Path) -> None:
    nodes = [_cpu_node(1, 30), _cpu_node(2, 28), _cpu_node(3, 26)]
    plan = _plan({LLAMA_70B.name: model70}, LLAMA_70B, nodes, ctx=2048)
    assert plan.fits and len({a.node for a in plan.assignments}) >= 2, plan.reason
    largest = plan.assignments[-1].node  # the most room: last, with the output layer
    moved = with_coordinator_share(plan, nodes, Headroom(), largest)
    assert moved is not None and moved.assignments[0].node == largest
    assert_consistent(moved)
    # With its layers first, a CPU share is exactly the layers llama.cpp keeps on the host when
    # --n-gpu-layers offloads only the others.
    assert moved.assignments[0].first_layer == 0
    assert with_coordinator_share(moved, nodes, Headroom(), largest) is moved
    split = replace(moved, coordinator=largest)
    assert not split.local_last
    assert split.local_split == split.tensor_split[:1] and split.remote_split == split.tensor_split[1:]


def _gpu_node(i: int, free_gib: int) -> NodeView:
    return NodeView(f"10.0.1.{i}:50051", "ready", "running", f"10.0.1.{i}:50052", "7.0.0",
                    (DeviceView("CUDA0", 48 * GiB, free_gib * GiB, uuid=f"GPU-{i}"),))


def test_a_gpu_coordinators_share_goes_last_with_the_output_layer(model70: Path) -> None:
    # Its logits then never cross the network (decode_paths.py on an H200: 0.83 of one GPU last,
    # 0.78 first).
    nodes = [_gpu_node(1, 30), _gpu_node(2, 28), _gpu_node(3, 26)]
    plan = _plan({LLAMA_70B.name: model70}, LLAMA_70B, nodes, ctx=2048)
    assert plan.fits and len({a.node for a in plan.assignments}) >= 2, plan.reason
    first = plan.assignments[0].node
    moved = with_coordinator_share(plan, nodes, Headroom(), first)
    assert moved is not None and moved.assignments[-1].node == first and moved.assignments[0].node != first
    assert_consistent(moved)
    placed = replace(moved, coordinator=first)
    assert placed.local_last and placed.local_split == placed.tensor_split[-1:]
    assert placed.remote_split == placed.tensor_split[:-1] and placed.remote_split[-1] == moved.assignments[-2].layer_count
    # The node already last (the usual largest share) is left where it is.
    last = plan.assignments[-1].node
    assert with_coordinator_share(plan, nodes, Headroom(), last) is plan


def test_a_gpu_share_without_room_for_the_output_layer_goes_first(model70: Path) -> None:
    plan = _plan({LLAMA_70B.name: model70}, LLAMA_70B, [_gpu_node(1, 30), _gpu_node(2, 28), _gpu_node(3, 26)], ctx=2048)
    exact = [NodeView(a, "ready", "running", f"{a}-rpc", "7.0.0",
                      (DeviceView("CUDA0", 48 * GiB, sum(x.total_bytes for x in plan.assignments if x.node == a),
                                  uuid=f"GPU-{a}"),))
             for a in dict.fromkeys(x.node for x in plan.assignments)]
    first = plan.assignments[0].node
    assert with_coordinator_share(plan, exact, Headroom(0, 0), first) is plan  # first already; last does not fit


def test_a_plan_that_no_longer_fits_with_the_node_first_is_said(model70: Path) -> None:
    # The second node has room for its layers but not for the output layer it would get.
    header = read_gguf_header(model70)
    estimate = estimate_memory(header, 2048)
    plan = _plan({LLAMA_70B.name: model70}, LLAMA_70B, [_cpu_node(1, 30), _cpu_node(2, 28), _cpu_node(3, 26)], ctx=2048)
    tight = [NodeView(a, "ready", "running", f"{a}-rpc", "7.0.0",
                      (DeviceView("CPU", 64 * GiB, sum(x.total_bytes for x in plan.assignments if x.node == a)),))
             for a in dict.fromkeys(x.node for x in plan.assignments)]
    first = plan.assignments[-1].node
    assert estimate.output_bytes > 0
    assert with_coordinator_share(plan, tight, Headroom(0, 0), first) is None


class _Record:
    def __init__(self, address: str, status: pb.AgentStatus | None) -> None:
        self.address, self.status = address, status


class _Inventory:
    def __init__(self, records: list[_Record]) -> None:
        self._records = records

    def records(self) -> list[_Record]:
        return self._records


def test_which_agents_can_run_a_coordinator_is_read_from_their_reports() -> None:
    def status(proxy: str = "10.0.0.1:40000", install: str = "/opt/llama", available: int = 64 * GiB) -> pb.AgentStatus:
        return pb.AgentStatus(coordinator_proxy=proxy, build=pb.LlamaCppBuild(install_dir=install),
                              host=pb.HostMemory(total_bytes=64 * GiB, available_bytes=available))

    inventory = _Inventory([_Record("able", status()), _Record("old", status(proxy="")),
                            _Record("unbuilt", status(install="")), _Record("full", status(available=GiB)),
                            _Record("silent", None)])
    planner = Planner(None, inventory, None, Headroom(), 1, 4096)  # type: ignore[arg-type]
    reasons = planner.cannot_host(2 * GiB)
    assert reasons["able"] == ""
    assert "runs no coordinators" in reasons["old"]
    assert "no llama.cpp build" in reasons["unbuilt"]
    assert "1.0 GiB of host memory available" in reasons["full"] and "keeps 2.0 GiB there" in reasons["full"]
    assert reasons["silent"] == "has not reported yet"


def test_the_plan_says_a_gpu_coordinator_takes_the_last_layers(model70: Path) -> None:
    nodes = [_gpu_node(1, 30), _gpu_node(2, 28), _gpu_node(3, 26)]
    plan = _plan({LLAMA_70B.name: model70}, LLAMA_70B, nodes, ctx=2048)
    first = plan.assignments[0].node
    able = pb.AgentStatus(coordinator_proxy="10.0.1.9:40000", build=pb.LlamaCppBuild(install_dir="/opt/llama"),
                          host=pb.HostMemory(total_bytes=64 * GiB, available_bytes=64 * GiB))
    planner = Planner(None, _Inventory([_Record(n.address, able) for n in nodes]), None,  # type: ignore[arg-type]
                      Headroom(), 1, 4096)
    planner.coordinator_mode = first
    placed = planner._with_coordinator(replace(plan, holders=[n.address for n in nodes]), nodes)
    assert placed.coordinator == first and placed.local_last
    assert "last layers and the output layer" in placed.coordinator_reason
