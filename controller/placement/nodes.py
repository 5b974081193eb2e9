"""What placement knows of a worker: a plain snapshot, built from the agent's status."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceView:
    name: str  # as the rpc-server names it: CUDA0, CPU, …
    total_bytes: int
    free_bytes: int  # advertised (after the agent's --memory-limit)


@dataclass(frozen=True)
class NodeView:
    address: str  # the agent's gRPC address: the node's name in the inventory
    state: str  # ready, unreachable, maintenance
    rpc_state: str  # running, starting, backoff, failed, stopped, stopping
    endpoint: str  # the rpc-server's HOST:PORT
    protocol_version: str  # the rpc-server's, e.g. 7.0.0
    devices: tuple[DeviceView, ...] = field(default_factory=tuple)
    load: int = 0  # models already placed here

    @property
    def free_bytes(self) -> int:
        return sum(d.free_bytes for d in self.devices)
