"""NVML provider against a fake NVML module (the real one needs a GPU; see the device runs)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from llamafleet.agent.devices import DeviceInfo, HostProvider, NvmlProvider


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """Two GPUs; failures can be injected per call and device."""

    NVMLError = FakeNVMLError

    def __init__(self, fail: set[tuple[str, int]] | None = None, init_fails: bool = False) -> None:
        self.fail = fail or set()
        self.init_fails = init_fails
        self.inits = 0

    def _check(self, call: str, index: int) -> None:
        if (call, index) in self.fail:
            raise FakeNVMLError(f"{call} failed on {index}")

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.init_fails:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:
        self._check("count", -1)
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        self._check("memory", handle)
        return SimpleNamespace(total=80 * 2**30, free=70 * 2**30 + handle, used=10 * 2**30 - handle)

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        self._check("name", handle)
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        self._check("uuid", handle)
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetPciInfo(self, handle: int) -> Any:
        self._check("pci", handle)
        return SimpleNamespace(busId=f"00000000:{handle + 1:02X}:00.0".encode())

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._check("util", handle)
        return SimpleNamespace(gpu=42)


def test_reports_every_gpu() -> None:
    devices = NvmlProvider(FakeNvml()).devices()  # type: ignore[arg-type]
    assert [d.uuid for d in devices] == ["GPU-0000", "GPU-0001"]
    assert devices[0] == DeviceInfo("gpu", 0, "NVIDIA H100 80GB HBM3", "GPU-0000", 80 * 2**30, 70 * 2**30,
                                    10 * 2**30, 42, pci_bus_id="00000000:01:00.0")


def test_no_nvml_means_no_gpus_not_an_exception() -> None:
    fake = FakeNvml(init_fails=True)
    provider = NvmlProvider(fake)  # type: ignore[arg-type]
    assert provider.devices() == [] and provider.devices() == []
    assert fake.inits == 2, "init is retried (a driver may appear later)"


def test_missing_module_means_no_gpus() -> None:
    provider = NvmlProvider(None)
    provider._nvml = None  # as if nvidia-ml-py were not installed
    assert provider.devices() == []


def test_partial_errors_keep_what_can_be_known() -> None:
    fake = FakeNvml(fail={("memory", 0), ("name", 1), ("uuid", 1), ("util", 1)})
    devices = NvmlProvider(fake).devices()  # type: ignore[arg-type]
    # GPU 0 has no memory numbers: left out rather than advertised wrong.
    assert len(devices) == 1
    gpu = devices[0]
    assert (gpu.index, gpu.name, gpu.uuid, gpu.utilization_percent) == (1, "GPU 1", "", None)
    assert gpu.free_bytes == 70 * 2**30 + 1


def test_count_failure_gives_an_empty_list() -> None:
    assert NvmlProvider(FakeNvml(fail={("count", -1)})).devices() == []  # type: ignore[arg-type]


def test_memory_limit_caps_what_is_advertised() -> None:
    gpu = DeviceInfo("gpu", 0, "x", "u", total_bytes=80 * 2**30, free_bytes=70 * 2**30, used_bytes=10 * 2**30)
    capped = gpu.capped(20 * 2**30)
    assert (capped.total_bytes, capped.free_bytes) == (20 * 2**30, 20 * 2**30)
    assert (capped.physical_total_bytes, capped.physical_free_bytes) == (80 * 2**30, 70 * 2**30)
    small_free = DeviceInfo("gpu", 0, "x", "u", total_bytes=80 * 2**30, free_bytes=2**30, used_bytes=0).capped(20 * 2**30)
    assert small_free.free_bytes == 2**30
    assert gpu.capped(0).total_bytes == 80 * 2**30


def test_host_provider_reports_one_cpu_device() -> None:
    (cpu,) = HostProvider().devices()
    assert cpu.kind == "cpu" and cpu.total_bytes > 0 and 0 < cpu.free_bytes <= cpu.total_bytes
