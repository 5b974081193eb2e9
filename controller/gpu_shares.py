"""One GPU, several agents: count each GPU UUID once across the fleet.

Two agents on one machine (say, one per user, or a test pair) both see the same GPU through
NVML. Advertised as they report it, placement would put a model's layers on "both" and
overcommit the one card. So each UUID reported by more than one agent is checked here:

- when their advertised totals (each capped by its `--memory-limit`) add up to no more than the
  GPU's physical memory, the operator has split it already: each keeps what it advertises;
- otherwise the GPU is counted once: each agent gets a share of the physical total (and of the
  physical free) in proportion to what it advertises (equal shares without limits).

`llamafleet nodes` shows each such GPU with the agents that share it and how.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llamafleet.proto.v1 import agent_pb2 as pb

SPLIT_BY_LIMITS = "split by the agents' --memory-limit"
COUNTED_ONCE = "counted once: over-advertised, shared in proportion"


@dataclass(frozen=True)
class GpuShare:
    uuid: str
    name: str
    total_bytes: int  # what placement may use of it on this node
    free_bytes: int
    physical_total_bytes: int
    shared_with: tuple[str, ...]  # the other agents that advertise it
    how: str

    def doc(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "total_bytes": self.total_bytes, "free_bytes": self.free_bytes,
                "physical_total_bytes": self.physical_total_bytes, "shared_with": list(self.shared_with),
                "how": self.how}


def gpu_shares(statuses: Mapping[str, pb.AgentStatus]) -> dict[str, dict[str, GpuShare]]:
    """address → UUID → share, for the GPUs more than one of `statuses` reports (others are absent)."""
    reports: dict[str, list[tuple[str, pb.Device]]] = {}
    for address, status in sorted(statuses.items()):
        for device in status.devices:
            if device.kind == pb.DEVICE_KIND_GPU and device.uuid:
                reports.setdefault(device.uuid, []).append((address, device))
    out: dict[str, dict[str, GpuShare]] = {}
    for uuid, seen in reports.items():
        addresses = {address for address, _ in seen}
        if len(addresses) < 2:
            continue
        physical_total = max(d.physical_total_bytes or d.total_bytes for _, d in seen)
        physical_free = min(d.physical_free_bytes or d.free_bytes for _, d in seen)
        advertised = sum(d.total_bytes for _, d in seen)
        for address, device in seen:
            others = tuple(sorted(addresses - {address}))
            if advertised <= physical_total:
                share = GpuShare(uuid, device.name, device.total_bytes, device.free_bytes, physical_total, others,
                                 SPLIT_BY_LIMITS)
            else:
                part = device.total_bytes / advertised
                share = GpuShare(uuid, device.name, int(physical_total * part),
                                 min(device.free_bytes, int(physical_free * part)), physical_total, others, COUNTED_ONCE)
            out.setdefault(address, {})[uuid] = share
    return out
