"""What the worker has: GPUs from NVML, host RAM from the kernel (psutil).

Providers never raise for a missing or broken NVML: no NVML means no GPUs to report, and a
device whose memory cannot be read is left out rather than advertised with made-up numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Protocol

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "gpu" or "cpu"
    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization_percent: int | None = None
    physical_total_bytes: int = 0
    physical_free_bytes: int = 0
    pci_bus_id: str = ""  # NVML's, e.g. 00000000:01:00.0 ("" when unknown or not a GPU)

    def capped(self, limit: int) -> DeviceInfo:
        """Advertise at most `limit` bytes (0: no cap); the physical numbers stay as they are."""
        physical = replace(self, physical_total_bytes=self.total_bytes, physical_free_bytes=self.free_bytes)
        if not limit:
            return physical
        return replace(physical, total_bytes=min(self.total_bytes, limit), free_bytes=min(self.free_bytes, limit))


@dataclass(frozen=True)
class HostMemoryInfo:
    total_bytes: int
    available_bytes: int


class DeviceProvider(Protocol):
    def devices(self) -> list[DeviceInfo]: ...


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml  # from nvidia-ml-py
    except ImportError:
        # nvidia-ml-py not installed: this worker reports no GPUs.
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlProvider:
    """GPUs via NVML. `nvml` can be injected (tests pass a fake module)."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml if nvml is not None else _import_nvml()
        self._initialised = False
        self._unavailable_logged = False

    def _ensure_init(self) -> bool:
        if self._nvml is None:
            return False
        if self._initialised:
            return True
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:
            # No driver (a CPU worker, a container without GPUs): report none, say so once.
            if not self._unavailable_logged:
                log.info("NVML unavailable, reporting no GPUs: %s", exc)
                self._unavailable_logged = True
            return False
        self._initialised = True
        return True

    def devices(self) -> list[DeviceInfo]:
        if not self._ensure_init():
            return []
        nvml = self._nvml
        assert nvml is not None
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            # The driver went away under us: no GPUs this time, try again next time.
            log.warning("NVML device count failed: %s", exc)
            return []
        found = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:
                # Without memory numbers the device cannot be placed on: leave it out.
                log.warning("NVML: skipping GPU %d: %s", index, exc)
                continue
            found.append(DeviceInfo(
                kind="gpu",
                index=index,
                name=self._optional(lambda h=handle: _text(nvml.nvmlDeviceGetName(h)), f"GPU {index}"),
                uuid=self._optional(lambda h=handle: _text(nvml.nvmlDeviceGetUUID(h)), ""),
                pci_bus_id=self._optional(lambda h=handle: _text(nvml.nvmlDeviceGetPciInfo(h).busId), ""),
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
                used_bytes=int(memory.used),
                utilization_percent=self._optional(
                    lambda h=handle: int(nvml.nvmlDeviceGetUtilizationRates(h).gpu), None),
            ))
        return found

    def _optional(self, read: Any, fallback: Any) -> Any:
        assert self._nvml is not None
        try:
            return read()
        except self._nvml.NVMLError:
            # Name, UUID and utilisation are nice to have; memory is what placement needs.
            return fallback


class HostProvider:
    """The host's RAM, as one CPU device (what a CPU rpc-server holds) and as host memory."""

    def memory(self) -> HostMemoryInfo:
        vm = psutil.virtual_memory()
        return HostMemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available))

    def devices(self) -> list[DeviceInfo]:
        memory = self.memory()
        return [DeviceInfo(
            kind="cpu", index=0, name="CPU", uuid="",
            total_bytes=memory.total_bytes, free_bytes=memory.available_bytes,
            used_bytes=memory.total_bytes - memory.available_bytes,
        )]
