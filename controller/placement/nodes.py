"""What placement knows of a worker: a plain snapshot, built from the agent's status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace


def device_key(name: str, uuid: str) -> str:
    """What tells a node's devices apart: the GPU's UUID when known, else the rpc-server's name.
    Not the name alone: with --rpc-layout per-device every GPU is its own process's CUDA0."""
    return uuid or name


@dataclass(frozen=True)
class DeviceView:
    name: str  # as the rpc-server names it: CUDA0, CPU, …
    total_bytes: int
    free_bytes: int  # advertised (after the agent's --memory-limit, and the GPU's share across the fleet)
    uuid: str = ""  # the GPU's NVML UUID, "" when not known (a CPU, an agent without NVML)
    server: int = 0  # which rpc-server of the node's slot serves it (per-device layout: one per GPU)


@dataclass(frozen=True)
class RpcServerView:
    """One of a node's rpc-servers: each serves one coordinator (one model) at a time."""

    index: int
    state: str  # running, starting, backoff, failed, stopped, stopping
    endpoint: str
    slot: int | None = None  # the model slot it serves in (None: its own, as with the shared layout)

    @property
    def model_slot(self) -> int:
        return self.index if self.slot is None else self.slot


@dataclass(frozen=True)
class ModelFileView:
    """A GGUF file in the node's models dir, as its agent reports it."""

    name: str
    size_bytes: int
    sha256: str  # "" while the agent is still hashing it


@dataclass(frozen=True)
class NodeView:
    address: str  # the agent's gRPC address: the node's name in the inventory
    state: str  # ready, unreachable, maintenance
    rpc_state: str  # running, starting, backoff, failed, stopped, stopping
    endpoint: str  # the rpc-server's HOST:PORT
    protocol_version: str  # the rpc-server's, e.g. 7.0.0
    devices: tuple[DeviceView, ...] = field(default_factory=tuple)
    load: int = 0  # models already placed here
    # Every rpc-server slot of the node; `endpoint` above is the one a plan uses (the first until
    # placement picks a free one; whether it must be started first, the manager asks the live
    # report, which is newer than any view).
    rpc_servers: tuple[RpcServerView, ...] = field(default_factory=tuple)
    rpc_index: int = 0  # which slot `endpoint` is
    # The chosen slot's rpc-servers by position, as (endpoint, index), when there is more than
    # one (per-device layout): device d is served by slot_servers[d.server].
    slot_servers: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    model_files: tuple[ModelFileView, ...] = field(default_factory=tuple)  # what its models dir holds
    # Why its first slot is not running, as the agent said (e.g. a GPU identity mismatch).
    rpc_error: str = ""

    def reserving(self, reserved: Mapping[tuple[str, str], int]) -> NodeView:
        """This node with memory already promised to loaded models taken off each device
        (`reserved`: bytes by (address, device_key)).

        Free is the smaller of what the agent reports and total minus what we placed here: the
        report lags a fresh load by a heartbeat, and a capped CPU device never shows our use.
        """
        devices = tuple(
            replace(d, free_bytes=max(min(d.free_bytes,
                                          d.total_bytes - reserved.get((self.address, device_key(d.name, d.uuid)), 0)), 0))
            for d in self.devices
        )
        return replace(self, devices=devices)

    def server_of(self, device: DeviceView) -> tuple[str, int]:
        """(endpoint, rpc-server index) that serves `device` in the chosen slot."""
        if device.server < len(self.slot_servers):
            return self.slot_servers[device.server]
        return self.endpoint, self.rpc_index

    @property
    def free_bytes(self) -> int:
        return sum(d.free_bytes for d in self.devices)
