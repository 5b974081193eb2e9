"""Which GPUs each rpc-server serves, and the check that its `CUDAn` is the GPU NVML names.

NVML and CUDA number GPUs differently. NVML counts in PCI bus order and ignores
`CUDA_VISIBLE_DEVICES`; CUDA counts fastest first by default (`CUDA_DEVICE_ORDER`), and only
the GPUs `CUDA_VISIBLE_DEVICES` shows, in the order it names them. The rpc-server's banner gives
each device a name (`CUDA0`), a description and its memory: no UUID, no PCI bus id. So the agent
does not guess the mapping, it sets it: every rpc-server starts with `CUDA_DEVICE_ORDER=PCI_BUS_ID`
and `CUDA_VISIBLE_DEVICES=<the UUIDs of the GPUs it may use>`, which makes its `CUDAi` the i-th
of those UUIDs, whatever the agent itself inherited. The banner is then checked against NVML
(count, model name, total memory); one that does not match means something defeated the pin,
and the rpc-server is stopped as failed with that reason: a node error, never a split over the
wrong GPUs.

The operator's own `CUDA_VISIBLE_DEVICES` still decides which GPUs the agent uses and how it
numbers them (`--devices CUDA1` means what it means to any CUDA program started beside the
agent); it is resolved against NVML once, here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from llamafleet.agent.devices import DeviceInfo
from llamafleet.agent.settings import RPC_LAYOUTS
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.banner import MIB, BannerDevice

_CUDA_NAME = re.compile(r"^CUDA(\d+)$")
# The CUDA runtime's total is NVML's minus what the driver keeps (616 MiB of an H200's 143,771).
MEMORY_TOLERANCE = 0.03


class GpuIdentityError(LlamafleetError):
    """The GPUs the agent was told to use cannot be matched to what NVML reports."""


@dataclass(frozen=True)
class RpcGroup:
    """What one rpc-server process serves (in one model slot)."""

    device_args: tuple[str, ...]  # its -d list; () for the rpc-server's default (every accelerator)
    gpus: tuple[DeviceInfo, ...]  # the GPUs its banner must list as CUDA devices, in banner order
    env: Mapping[str, str] = field(default_factory=dict)  # on top of the agent's environment

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(g.uuid for g in self.gpus)


def is_cuda_device(name: str) -> bool:
    return _CUDA_NAME.match(name) is not None


def in_pci_order(gpus: Sequence[DeviceInfo]) -> list[DeviceInfo]:
    """NVML's GPUs by PCI bus id (the order NVML's index usually has; the id decides)."""
    return sorted(gpus, key=lambda g: (g.pci_bus_id.lower() or "~", g.index))


def visible_gpus(gpus: Sequence[DeviceInfo], cuda_visible: str | None, device_order: str | None) -> list[DeviceInfo]:
    """The GPUs a CUDA program started with this environment sees, as `CUDA0, CUDA1, …`.

    `cuda_visible`: the agent's CUDA_VISIBLE_DEVICES (None: unset); `device_order`: its
    CUDA_DEVICE_ORDER. Entries are indices or (prefixes of) UUIDs, as CUDA reads them; anything
    this cannot resolve without guessing is a GpuIdentityError that says what to write instead.
    """
    ordered = in_pci_order([g for g in gpus if g.kind == "gpu"])
    if cuda_visible is None:
        # Unset means every GPU; the pin keeps PCI order (nvidia-smi's), not fastest first.
        return ordered
    entries = [e.strip() for e in cuda_visible.split(",") if e.strip()]
    chosen: list[DeviceInfo] = []
    for entry in entries:
        gpu = _resolve(entry, ordered, cuda_visible, device_order)
        if gpu.uuid in {c.uuid for c in chosen}:
            raise GpuIdentityError(f"CUDA_VISIBLE_DEVICES={cuda_visible} names {gpu.uuid} twice")
        chosen.append(gpu)
    return chosen


def _alike(gpus: Sequence[DeviceInfo]) -> bool:
    """All the same model: CUDA's fastest-first order cannot tell them apart and keeps PCI order."""
    return len({(_model(g.name), g.total_bytes) for g in gpus}) <= 1


def _resolve(entry: str, ordered: list[DeviceInfo], cuda_visible: str, device_order: str | None) -> DeviceInfo:
    if entry.isdigit():
        position = int(entry)
        if position >= len(ordered):
            raise GpuIdentityError(f"CUDA_VISIBLE_DEVICES={cuda_visible} names GPU {position}, but NVML "
                                   f"reports {len(ordered)} GPU(s)")
        if (device_order or "").strip().upper() != "PCI_BUS_ID" and not _alike(ordered):
            raise GpuIdentityError(
                f"CUDA_VISIBLE_DEVICES={cuda_visible} names GPUs by index, and with CUDA's default "
                "order (fastest first) on this host of different GPUs an index is not NVML's: name "
                "them by UUID (`nvidia-smi -L`) or set CUDA_DEVICE_ORDER=PCI_BUS_ID")
        return ordered[position]
    if entry.upper().startswith("MIG-"):
        raise GpuIdentityError(f"CUDA_VISIBLE_DEVICES={cuda_visible} names a MIG instance ({entry}): "
                               "llamafleet places whole GPUs only")
    matches = [g for g in ordered if g.uuid and g.uuid.lower().startswith(entry.lower())]
    if len(matches) != 1:
        found = "no GPU" if not matches else f"{len(matches)} GPUs"
        raise GpuIdentityError(f"CUDA_VISIBLE_DEVICES={cuda_visible}: '{entry}' matches {found} that NVML "
                               f"reports ({', '.join(g.uuid for g in ordered) or 'none'})")
    return matches[0]


def pin_env(gpus: Sequence[DeviceInfo]) -> dict[str, str]:
    """The environment that makes an rpc-server's CUDAi the i-th of `gpus`."""
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(g.uuid for g in gpus)}


def rpc_groups(layout: str, visible: Sequence[DeviceInfo], devices: Sequence[str]) -> list[RpcGroup]:
    """The rpc-server processes of one model slot.

    `visible`: from `visible_gpus` (empty on a CPU worker, or without NVML: then nothing is
    pinned or checked, and the rpc-server's own banner is all there is). `devices`: the agent's
    `--devices` (names as CUDA numbers them under the operator's environment; () for all).
    shared: one process serving every device; per-device: one process per GPU (a device that
    is not a CUDA GPU, such as CPU, gets a process of its own too).
    """
    if layout not in RPC_LAYOUTS:
        raise GpuIdentityError(f"rpc layout must be one of {', '.join(RPC_LAYOUTS)}, not '{layout}'")
    if not visible:
        if layout == "per-device" and devices:
            return [RpcGroup((name,), ()) for name in devices]
        return [RpcGroup(tuple(devices), ())]
    if any(not g.uuid for g in visible):
        raise GpuIdentityError("NVML gives no UUID for GPU(s) "
                               f"{', '.join(str(g.index) for g in visible if not g.uuid)}: without one the "
                               "agent cannot tell which CUDA device is which")
    named = [(name, _named_gpu(name, visible)) for name in devices] if devices else [
        (f"CUDA{i}", gpu) for i, gpu in enumerate(visible)]
    env = pin_env(visible)
    if layout == "shared":
        return [RpcGroup(tuple(devices), tuple(g for _, g in named if g is not None), env)]
    groups = []
    for name, gpu in named:
        if gpu is None:
            # Not a GPU of ours (CPU, Vulkan0): its own process, seeing no CUDA device at all.
            groups.append(RpcGroup((name,), (), {"CUDA_VISIBLE_DEVICES": ""}))
        else:
            groups.append(RpcGroup(("CUDA0",), (gpu,), pin_env([gpu])))
    return groups


def _named_gpu(name: str, visible: Sequence[DeviceInfo]) -> DeviceInfo | None:
    match = _CUDA_NAME.match(name)
    if match is None:
        return None
    position = int(match.group(1))
    if position >= len(visible):
        raise GpuIdentityError(f"--devices names {name}, but this agent sees {len(visible)} GPU(s) "
                               f"(CUDA0-CUDA{len(visible) - 1})" if visible else f"--devices names {name}, "
                               "but this agent sees no GPU")
    return visible[position]


def _model(name: str) -> str:
    """`NVIDIA GeForce RTX 3090` and `GeForce RTX 3090` (older drivers) are one model."""
    return " ".join(name.split()).lower().removeprefix("nvidia ")


def check_banner(banner: Sequence[BannerDevice], expected: Sequence[DeviceInfo]) -> str:
    """Why the rpc-server's CUDA devices are not `expected` in order ("" when they are)."""
    if not expected:
        return ""
    cuda = [d for d in banner if _CUDA_NAME.match(d.name)]
    if len(cuda) != len(expected):
        return (f"GPU identity: the rpc-server lists {len(cuda)} CUDA device(s) "
                f"({', '.join(d.name for d in cuda) or 'none'}), the agent gave it {len(expected)} "
                f"({', '.join(g.uuid for g in expected)})")
    for device, gpu in zip(cuda, expected, strict=True):
        problem = ""
        if _model(device.description) != _model(gpu.name):
            problem = f"is a {device.description}"
        elif abs(device.total_bytes - gpu.total_bytes) > MEMORY_TOLERANCE * gpu.total_bytes + MIB:
            problem = f"has {device.total_bytes // MIB} MiB"
        if problem:
            return (f"GPU identity: the rpc-server's {device.name} {problem}, but the agent gave it "
                    f"{gpu.uuid} (bus {gpu.pci_bus_id or '?'}: {gpu.name}, {gpu.total_bytes // MIB} MiB): "
                    "the CUDA_VISIBLE_DEVICES pin did not take; not serving rather than placing on the wrong GPU")
    return ""

