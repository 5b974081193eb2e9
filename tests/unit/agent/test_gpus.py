"""GPU identity between NVML and the rpc-server (agent/gpus.py), with fake NVML hosts of 2 and 4 GPUs.

The fixtures' NVML index order is deliberately not PCI order on the 4-GPU host, and the
mixed host (2×3090 + a 4090) is the one where CUDA's fastest-first order differs from NVML's.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from llamafleet.agent.devices import DeviceInfo, NvmlProvider
from llamafleet.agent.convert import rpc_devices_to_proto
from llamafleet.agent.gpus import GpuIdentityError, check_banner, rpc_groups, visible_gpus
from llamafleet.agent.supervisor import RpcServerSnapshot, RpcState
from llamafleet.common.llamacpp.banner import MIB, BannerDevice

GiB = 2**30


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """NVML over a list of (name, uuid, bus id, total bytes), in NVML index order."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[tuple[str, str, str, int]]) -> None:
        self.gpus = gpus

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        total = self.gpus[handle][3]
        return SimpleNamespace(total=total, free=total - GiB, used=GiB)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self.gpus[handle][0].encode()

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.gpus[handle][1]

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        return SimpleNamespace(busId=self.gpus[handle][2].encode())

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=0)


def nvml_host(gpus: list[tuple[str, str, str, int]]) -> list[DeviceInfo]:
    return NvmlProvider(FakeNvml(gpus)).devices()  # type: ignore[arg-type]


H100 = "NVIDIA H100 80GB HBM3"
# NVML index 0 sits on bus 41, index 1 on bus 01: index order is not bus order here.
FOUR_H100 = nvml_host([
    (H100, "GPU-aaaa-0041", "00000000:41:00.0", 80 * GiB),
    (H100, "GPU-bbbb-0001", "00000000:01:00.0", 80 * GiB),
    (H100, "GPU-cccc-0081", "00000000:81:00.0", 80 * GiB),
    (H100, "GPU-dddd-00c1", "00000000:C1:00.0", 80 * GiB),
])
MIXED = nvml_host([
    ("NVIDIA GeForce RTX 3090", "GPU-3090-a", "00000000:01:00.0", 24 * GiB),
    ("NVIDIA GeForce RTX 3090", "GPU-3090-b", "00000000:02:00.0", 24 * GiB),
    ("NVIDIA GeForce RTX 4090", "GPU-4090-c", "00000000:03:00.0", 24 * GiB - 80 * MIB),
])
TWO_H100 = FOUR_H100[:2]


def uuids(gpus: list[DeviceInfo] | tuple[DeviceInfo, ...]) -> list[str]:
    return [g.uuid for g in gpus]


def banner_of(gpus: list[DeviceInfo], short_by_mib: int = 480) -> list[BannerDevice]:
    """What the rpc-server prints for these GPUs as CUDA0.. (the runtime sees a little less than NVML)."""
    return [BannerDevice(f"CUDA{i}", g.name, g.total_bytes - short_by_mib * MIB, g.free_bytes - short_by_mib * MIB)
            for i, g in enumerate(gpus)]


# ---- which GPUs, in which order ----------------------------------------------------------------

def test_unset_cuda_visible_devices_means_every_gpu_in_pci_order() -> None:
    assert uuids(visible_gpus(FOUR_H100, None, None)) == ["GPU-bbbb-0001", "GPU-aaaa-0041", "GPU-cccc-0081",
                                                          "GPU-dddd-00c1"]
    assert uuids(visible_gpus(TWO_H100, None, None)) == ["GPU-bbbb-0001", "GPU-aaaa-0041"]


def test_reordered_indices_follow_cuda_visible_devices() -> None:
    # CUDA_VISIBLE_DEVICES=3,1 on identical GPUs: CUDA0 is the 4th by bus, CUDA1 the 2nd.
    assert uuids(visible_gpus(FOUR_H100, "3,1", None)) == ["GPU-dddd-00c1", "GPU-aaaa-0041"]
    assert uuids(visible_gpus(TWO_H100, "1,0", "PCI_BUS_ID")) == ["GPU-aaaa-0041", "GPU-bbbb-0001"]


def test_uuid_entries_and_unique_prefixes_resolve() -> None:
    assert uuids(visible_gpus(FOUR_H100, "GPU-cccc, GPU-bbbb-0001", None)) == ["GPU-cccc-0081", "GPU-bbbb-0001"]
    assert uuids(visible_gpus(MIXED, "GPU-4090-c,GPU-3090-a", None)) == ["GPU-4090-c", "GPU-3090-a"]


def test_indices_on_mixed_gpus_without_pci_order_are_refused() -> None:
    # Fastest first would make the 4090 CUDA0: an index cannot be matched to NVML without guessing.
    with pytest.raises(GpuIdentityError, match="by UUID .*CUDA_DEVICE_ORDER=PCI_BUS_ID"):
        visible_gpus(MIXED, "0,1", None)
    assert uuids(visible_gpus(MIXED, "2,0", "PCI_BUS_ID")) == ["GPU-4090-c", "GPU-3090-a"]


@pytest.mark.parametrize(("value", "message"), [
    ("4", "names GPU 4, but NVML reports 4"),
    ("GPU-", "matches 4 GPUs"),
    ("GPU-ffff", "matches no GPU"),
    ("1,GPU-aaaa", "twice"),
    ("MIG-1234", "MIG"),
])
def test_unresolvable_entries_say_why(value: str, message: str) -> None:
    with pytest.raises(GpuIdentityError, match=message):
        visible_gpus(FOUR_H100, value, None)


def test_empty_cuda_visible_devices_hides_every_gpu() -> None:
    assert visible_gpus(FOUR_H100, "", None) == []


# ---- what each rpc-server serves --------------------------------------------------------------

def test_shared_layout_is_one_process_pinned_to_every_visible_gpu() -> None:
    visible = visible_gpus(FOUR_H100, "3,1", None)
    (group,) = rpc_groups("shared", visible, ())
    assert group.device_args == ()
    assert group.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-dddd-00c1,GPU-aaaa-0041"}
    assert uuids(group.gpus) == ["GPU-dddd-00c1", "GPU-aaaa-0041"]


def test_shared_layout_with_devices_expects_them_in_dash_d_order() -> None:
    (group,) = rpc_groups("shared", visible_gpus(FOUR_H100, None, None), ("CUDA2", "CUDA0"))
    assert group.device_args == ("CUDA2", "CUDA0")
    # The pin keeps every visible GPU, so CUDA2 is still the third by bus.
    assert group.env["CUDA_VISIBLE_DEVICES"].count(",") == 3
    assert uuids(group.gpus) == ["GPU-cccc-0081", "GPU-bbbb-0001"]


def test_per_device_layout_is_one_process_per_gpu_each_seeing_only_its_own() -> None:
    groups = rpc_groups("per-device", visible_gpus(FOUR_H100, "GPU-dddd,GPU-aaaa", None), ())
    assert [(g.device_args, g.env["CUDA_VISIBLE_DEVICES"]) for g in groups] == [
        (("CUDA0",), "GPU-dddd-00c1"), (("CUDA0",), "GPU-aaaa-0041")]
    two = rpc_groups("per-device", visible_gpus(TWO_H100, None, None), ())
    assert [uuids(g.gpus) for g in two] == [["GPU-bbbb-0001"], ["GPU-aaaa-0041"]]


def test_per_device_layout_gives_a_non_gpu_device_its_own_process() -> None:
    groups = rpc_groups("per-device", visible_gpus(TWO_H100, None, None), ("CUDA1", "CPU"))
    assert [(g.device_args, uuids(g.gpus), dict(g.env).get("CUDA_VISIBLE_DEVICES")) for g in groups] == [
        (("CUDA0",), ["GPU-aaaa-0041"], "GPU-aaaa-0041"), (("CPU",), [], "")]


def test_a_cpu_worker_is_one_unpinned_process_in_either_layout() -> None:
    assert rpc_groups("shared", [], ()) == rpc_groups("per-device", [], ())
    (group,) = rpc_groups("per-device", [], ())
    assert (group.device_args, group.gpus, dict(group.env)) == ((), (), {})


def test_devices_past_the_visible_gpus_are_refused() -> None:
    with pytest.raises(GpuIdentityError, match="--devices names CUDA2, but this agent sees 2 GPU"):
        rpc_groups("shared", visible_gpus(TWO_H100, None, None), ("CUDA2",))


def test_a_gpu_without_a_uuid_cannot_be_pinned() -> None:
    nameless = [g if g.index else DeviceInfo(**{**g.__dict__, "uuid": ""}) for g in TWO_H100]
    with pytest.raises(GpuIdentityError, match="no UUID"):
        rpc_groups("shared", in_order(nameless), ())


def in_order(gpus: list[DeviceInfo]) -> list[DeviceInfo]:
    return sorted(gpus, key=lambda g: g.pci_bus_id)


# ---- the banner check -------------------------------------------------------------------------

def test_a_banner_that_matches_passes_and_maps_names_to_uuids() -> None:
    (group,) = rpc_groups("shared", visible_gpus(MIXED, "GPU-4090,GPU-3090-b", None), ())
    banner = banner_of(list(group.gpus))
    assert check_banner(banner, group.gpus) == ""
    # As the agent reports it: each CUDA device of the banner with the GPU it was pinned to.
    snap = RpcServerSnapshot(RpcState.RUNNING, devices=(BannerDevice("CPU", "host", GiB, GiB), *banner),
                             gpu_ids=tuple((g.uuid, g.pci_bus_id) for g in group.gpus))
    assert [(d.name, d.uuid, d.pci_bus_id) for d in rpc_devices_to_proto(snap)] == [
        ("CPU", "", ""), ("CUDA0", "GPU-4090-c", "00000000:03:00.0"), ("CUDA1", "GPU-3090-b", "00000000:02:00.0")]


def test_a_banner_in_another_order_is_a_node_error() -> None:
    # As if the pin had not taken and CUDA had put the 3090 first.
    (group,) = rpc_groups("shared", visible_gpus(MIXED, "GPU-4090,GPU-3090-b", None), ())
    swapped = banner_of([group.gpus[1], group.gpus[0]])
    assert "CUDA0 is a NVIDIA GeForce RTX 3090, but the agent gave it GPU-4090-c" in check_banner(swapped, group.gpus)


def test_a_banner_with_another_gpu_of_other_memory_is_a_node_error() -> None:
    gpu = TWO_H100[0]
    other = [BannerDevice("CUDA0", gpu.name, 40 * GiB, 39 * GiB)]
    assert "CUDA0 has 40960 MiB" in check_banner(other, [gpu])


def test_a_banner_with_a_different_gpu_count_is_a_node_error() -> None:
    visible = visible_gpus(FOUR_H100, None, None)
    problem = check_banner(banner_of(visible[:3]), visible)
    assert problem.startswith("GPU identity: the rpc-server lists 3 CUDA device(s)")


def test_cpu_devices_in_the_banner_are_not_gpus_and_an_unpinned_server_is_not_checked() -> None:
    gpu = TWO_H100[0]
    banner = [BannerDevice("CPU", "AMD EPYC", 64 * GiB, 60 * GiB), *banner_of([gpu])]
    assert check_banner(banner, [gpu]) == ""
    assert check_banner(banner, []) == ""
