"""Placement against JSON fixtures of realistic machines and GGUF headers of realistic shapes."""

from __future__ import annotations

import bisect
import json
import random
from pathlib import Path

import pytest

from llamafleet.controller.estimate import MemoryEstimate, estimate_memory
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.controller.placement.nodes import DeviceView, NodeView
from llamafleet.controller.placement.plan import Headroom, Plan, make_plan
from tests.fixtures.synthetic_gguf import LLAMA_8B, LLAMA_70B, LLAMA_405B, Shape, write_model

HOSTS = Path(__file__).resolve().parents[2] / "fixtures" / "hosts"
MiB, GiB = 2**20, 2**30


def hosts(name: str) -> list[NodeView]:
    return [
        NodeView(n["address"], n["state"], n["rpc_state"], n["endpoint"], n["protocol_version"],
                 tuple(DeviceView(**d) for d in n["devices"]), n["load"])
        for n in json.loads((HOSTS / name).read_text())
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {s.name: write_model(folder / f"{s.name}.gguf", s) for s in (LLAMA_8B, LLAMA_70B, LLAMA_405B)}


def _plan(models: dict[str, Path], shape: Shape, nodes: list[NodeView], ctx: int = 8192, **kw: object) -> Plan:
    header = read_gguf_header(models[shape.name])
    return make_plan(shape.name, estimate_memory(header, ctx), nodes, "7.0.0",
                     estimate_for_ctx=lambda c: estimate_memory(header, c), **kw)  # type: ignore[arg-type]


def llama_cpp_layer_devices(split: list[int], n_layers: int) -> list[int]:
    """Which device llama.cpp gives each layer (and the output, as layer n_layers) for a split.

    Mirrors llama.cpp's rule with every layer offloaded: cumulative split fractions, and layer il
    goes to the first device whose cumulative fraction exceeds il / (n_layers + 1).
    """
    total = sum(split)
    cumulative, running = [], 0
    for count in split:
        running += count
        cumulative.append(running / total)
    return [bisect.bisect_right(cumulative, il / (n_layers + 1)) for il in range(n_layers + 1)]


def assert_consistent(plan: Plan) -> None:
    estimate = plan.estimate
    assert plan.fits
    expected = []
    for device_index, a in enumerate(plan.assignments):
        expected += [device_index] * a.layer_count
        assert a.total_bytes <= a.usable_bytes, f"{a.node}/{a.device} overflows"
    expected.append(len(plan.assignments) - 1)  # the output layer
    assert llama_cpp_layer_devices(plan.tensor_split, estimate.n_layers) == expected
    assert sum(a.layer_count for a in plan.assignments) == estimate.n_layers
    assert plan.assignments[-1].output_bytes == estimate.output_bytes


def test_8b_fits_on_one_3090_node_and_uses_the_fewest_backends(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_8B, hosts("mixed-3090-4090.json"))
    assert_consistent(plan)
    assert len(plan.backends) == 1
    # The 2×3090 node has the most free memory: it is chosen, the other is not needed.
    assert plan.backends == ["192.168.1.20:50052"]
    assert plan.excluded == {"192.168.1.21:50051": "not needed: fewer backends hold the model"}


def test_70b_is_split_over_the_two_gpus_of_one_node(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_70B, hosts("mixed-3090-4090.json"), ctx=4096)
    assert_consistent(plan)
    assert [(a.endpoint, a.device) for a in plan.assignments] == [("192.168.1.20:50052", "CUDA0"),
                                                                   ("192.168.1.20:50052", "CUDA1")]


def test_70b_with_a_long_context_needs_the_second_node(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_70B, hosts("mixed-3090-4090.json"), ctx=32768)
    assert_consistent(plan)
    assert set(plan.backends) == {"192.168.1.20:50052", "192.168.1.21:50052"}
    assert len(plan.tensor_split) == 3


def test_405b_fits_on_one_8x_h100_node(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_405B, hosts("8x-h100.json"))
    assert_consistent(plan)
    assert len(plan.backends) == 1 and len(plan.assignments) == 8


def test_405b_does_not_fit_a_home_lab_and_says_by_how_much(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_405B, hosts("mixed-3090-4090.json"))
    assert not plan.fits and not plan.assignments
    assert "short by" in plan.reason and "more node(s) like the largest" in plan.reason


def test_too_long_context_suggests_the_largest_that_fits(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_8B, hosts("cpu-64gb.json"), ctx=1_000_000)
    assert not plan.fits
    assert "a context of at most" in plan.reason
    best = int(plan.reason.split("a context of at most ")[1].split()[0])
    assert _plan(models, LLAMA_8B, hosts("cpu-64gb.json"), ctx=best).fits
    assert not _plan(models, LLAMA_8B, hosts("cpu-64gb.json"), ctx=best + 1).fits


def test_unified_memory_machines(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_70B, hosts("apple-unified.json"))
    assert_consistent(plan)
    assert plan.backends == ["192.168.1.40:50052"]


def test_every_excluded_node_has_its_reason(models: dict[str, Path]) -> None:
    plan = _plan(models, LLAMA_8B, hosts("home-lab-mixed-states.json"))
    assert_consistent(plan)
    assert plan.excluded["192.168.1.51:50051"].startswith("in maintenance")
    assert plan.excluded["192.168.1.52:50051"] == "node is unreachable"
    assert plan.excluded["192.168.1.53:50051"] == "rpc-server is backoff"
    assert "RPC protocol 6.1.0 differs from the coordinator's 7.0.0" in plan.excluded["192.168.1.54:50051"]
    assert plan.backends == ["192.168.1.55:50052"], "the CPU node has the most free memory"
    assert set(plan.excluded) == {n.address for n in hosts("home-lab-mixed-states.json")} - {"192.168.1.55:50051"}


def test_plan_is_deterministic_whatever_the_input_order(models: dict[str, Path]) -> None:
    nodes = hosts("8x-h100.json") + hosts("mixed-3090-4090.json") + hosts("apple-unified.json")
    first = _plan(models, LLAMA_405B, nodes)
    for seed in range(5):
        shuffled = nodes[:]
        random.Random(seed).shuffle(shuffled)
        again = _plan(models, LLAMA_405B, shuffled)
        assert (again.assignments, again.tensor_split, again.excluded) == (first.assignments, first.tensor_split, first.excluded)


def test_equal_memory_prefers_the_less_loaded_node(models: dict[str, Path]) -> None:
    devices = (DeviceView("CUDA0", 24 * GiB, 23 * GiB),)
    busy = NodeView("a:1", "ready", "running", "a:2", "7.0.0", devices, load=2)
    idle = NodeView("b:1", "ready", "running", "b:2", "7.0.0", devices, load=0)
    assert _plan(models, LLAMA_8B, [busy, idle]).backends == ["b:2"]


def test_headroom_is_respected(models: dict[str, Path]) -> None:
    node = hosts("cpu-64gb.json")
    estimate_total = _plan(models, LLAMA_70B, node, ctx=4096).estimate.device_total
    free = node[0].devices[0].free_bytes
    assert estimate_total < free
    tight = Headroom(min_bytes=free - estimate_total + GiB)
    plan = _plan(models, LLAMA_70B, node, ctx=4096, headroom=tight)
    assert not plan.fits




def test_output_layer_of_a_tied_model_is_counted_on_the_last_device(tmp_path: Path) -> None:
    tied = Shape("tied", 4, 1024, 4096, 8, 8, 32000, tied_output=True)
    header = read_gguf_header(write_model(tmp_path / "tied.gguf", tied))
    estimate: MemoryEstimate = estimate_memory(header, 1024)
    assert estimate.output_tied
    assert estimate.output_bytes == header.tensors_by_name["token_embd.weight"].n_bytes + \
        header.tensors_by_name["output_norm.weight"].n_bytes
