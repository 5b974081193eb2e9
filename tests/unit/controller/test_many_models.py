"""Many models on one fleet: one coordinator per rpc-server, request slots sized by memory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.patches import PRECOMPUTED_HASHES_PATCH
from llamafleet.controller.estimate import estimate_memory
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.controller.placement.filters import NEW_RPC_SERVER_GPU_BYTES, free_rpc_server
from llamafleet.controller.placement.nodes import DeviceView, NodeView, RpcServerView
from llamafleet.controller.models import ResolvedModel
from llamafleet.controller.placement.plan import Headroom, make_plan
from llamafleet.controller.planner import Planner
from llamafleet.controller.settings import parse_parallel
from tests.fixtures.synthetic_gguf import LLAMA_8B, write_model

MiB, GiB = 2**20, 2**30


def gpu_node(address: str = "10.0.0.5:50051", free: int = 24 * GiB, slots: tuple[str, ...] = ("running", "stopped")) -> NodeView:
    host = address.rsplit(":", 1)[0]
    servers = tuple(RpcServerView(i, state, f"{host}:{50052 + i}") for i, state in enumerate(slots))
    return NodeView(address, "ready", "running", f"{host}:50052", "7.0.0", (DeviceView("CUDA0", 24 * GiB, free),),
                    0, servers)


def test_a_node_whose_first_rpc_server_is_busy_offers_its_second_with_the_new_gpu_context_booked() -> None:
    node = gpu_node()
    result = free_rpc_server({"10.0.0.5:50052": "llama3"})([node])
    [chosen] = result.survivors
    assert (chosen.endpoint, chosen.rpc_index) == ("10.0.0.5:50053", 1)
    assert chosen.devices[0].free_bytes == node.devices[0].free_bytes - NEW_RPC_SERVER_GPU_BYTES


def test_a_free_running_rpc_server_is_taken_as_it_is() -> None:
    [chosen] = free_rpc_server({})([gpu_node()]).survivors
    assert (chosen.endpoint, chosen.rpc_index) == ("10.0.0.5:50052", 0)
    assert chosen.devices == gpu_node().devices


def test_a_node_with_every_rpc_server_held_is_dropped_naming_who_holds_them() -> None:
    result = free_rpc_server({"10.0.0.5:50052": "llama3", "10.0.0.5:50053": "qwen"})([gpu_node()])
    assert result.survivors == []
    why = result.dropped["10.0.0.5:50051"]
    assert "10.0.0.5:50052 serves llama3" in why and "10.0.0.5:50053 serves qwen" in why


def test_an_agent_without_rpc_servers_list_is_its_one_rpc_server() -> None:
    old = replace(gpu_node(), rpc_servers=())
    assert free_rpc_server({})([old]).survivors[0].endpoint == "10.0.0.5:50052"
    assert "serves llama3" in free_rpc_server({"10.0.0.5:50052": "llama3"})([old]).dropped["10.0.0.5:50051"]


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "llama8b.gguf", LLAMA_8B)


def test_a_plan_never_reuses_an_rpc_server_another_model_holds(llama8b: Path) -> None:
    header = read_gguf_header(llama8b)
    nodes = [gpu_node("10.0.0.5:50051", free=20 * GiB), gpu_node("10.0.0.6:50051", free=20 * GiB)]
    plan = make_plan("second", estimate_memory(header, 4096), nodes, "7.0.0", busy={"10.0.0.5:50052": "first"})
    assert plan.fits and "10.0.0.5:50052" not in plan.backends
    # The busiest-by-memory rule still decides which node; the one used gets a free slot.
    assert all(a.endpoint in ("10.0.0.5:50053", "10.0.0.6:50052") for a in plan.assignments)


class _Models:
    def __init__(self, path: Path) -> None:
        self.path = path

    def resolve(self, model: str) -> ResolvedModel:
        return ResolvedModel(model, self.path, "test")


class _Inventory:
    def __init__(self, nodes: list[NodeView]) -> None:
        self.nodes = nodes

    def node_views(self, load: dict[str, int] | None = None) -> list[NodeView]:
        return self.nodes


def _planner(path: Path, nodes: list[NodeView], parallel: int) -> Planner:
    # Stand-ins for the model store and the inventory: this tests the planner's slot search alone.
    return Planner(_Models(path), _Inventory(nodes), None, Headroom(0.0), parallel, 4096, 8)  # type: ignore[arg-type]


def test_auto_slots_are_the_most_that_fit_after_the_weights(llama8b: Path) -> None:
    header = read_gguf_header(llama8b)
    one = estimate_memory(header, 4096, 1)
    kv_per_slot = sum(one.kv_bytes_per_layer)
    # Room for the weights, compute and exactly three slots' KV (plus a little).
    free = one.device_total + 2 * kv_per_slot + 64 * MiB
    node = replace(gpu_node(free=free), devices=(DeviceView("CUDA0", free, free),))
    _, plan, _ = _planner(llama8b, [node], 0).plan("m")
    assert plan.fits and plan.estimate.parallel == 3
    # An explicit count wins, and says why when it does not fit.
    _, fixed, _ = _planner(llama8b, [node], 5).plan("m")
    assert not fixed.fits and fixed.estimate.parallel == 5
    # Plenty of room: capped at max_parallel.
    roomy = replace(node, devices=(DeviceView("CUDA0", 80 * GiB, 80 * GiB),))
    assert _planner(llama8b, [roomy], 0).plan("m")[1].estimate.parallel == 8


def test_auto_slots_never_cost_an_extra_node(llama8b: Path) -> None:
    header = read_gguf_header(llama8b)
    one = estimate_memory(header, 4096, 1)
    # The largest node holds the model with one slot and nothing more; a second node has room.
    tight = one.device_total + 16 * MiB
    nodes = [replace(gpu_node("10.0.0.5:50051"), devices=(DeviceView("CUDA0", tight, tight),)),
             replace(gpu_node("10.0.0.6:50051"), devices=(DeviceView("CUDA0", tight - MiB, tight - MiB),))]
    _, plan, _ = _planner(llama8b, nodes, 0).plan("m")
    assert plan.fits and plan.estimate.parallel == 1 and len(plan.backends) == 1


def test_parallel_setting_reads_auto_or_a_count() -> None:
    assert parse_parallel("auto") == 0 and parse_parallel("AUTO") == 0 and parse_parallel("4") == 4
    with pytest.raises(ValueError):
        parse_parallel("0")
    with pytest.raises(ValueError):
        parse_parallel("many")


class _RecordingHashes:
    # Records what the planner asks to pre-compute; the computation itself is test_tensor_hashes.py's.
    def __init__(self) -> None:
        self.prefetched: list[Path] = []

    def prefetch(self, model: Path, header: object) -> None:
        self.prefetched.append(model)


def _coordinator(patches: list[str]) -> Manifest:
    return Manifest(key="k", commit=None, source_id="s", source="/src", cmake_flags=[], backends=["CPU", "RPC"],
                    rpc_server="/bin/ggml-rpc-server", llama_server="/bin/llama-server", rpc_protocol_version="7.0.0",
                    version="version: 1", built_at_unix_ms=1, patches=[{"name": p, "sha256": "0"} for p in patches])


def test_a_patched_coordinator_starts_the_tensor_hashes_at_the_first_plan(llama8b: Path) -> None:
    # Before, only a plan that already knew holders started them: the first load after the
    # holders' digests were confirmed then waited for the hashes (2.6 s of a 4.9 s load on an H200).
    nodes = [gpu_node("10.0.0.5:50051", free=40 * GiB)]
    for patches, expected in (([PRECOMPUTED_HASHES_PATCH], [llama8b]), ([], [])):
        planner = Planner(_Models(llama8b), _Inventory(nodes), _coordinator(patches),  # type: ignore[arg-type]
                          Headroom(0.0), 1, 4096, 8)
        hashes = _RecordingHashes()
        planner.tensor_hashes = hashes  # type: ignore[assignment]
        assert planner.plan("m")[1].fits
        assert hashes.prefetched == expected, patches
