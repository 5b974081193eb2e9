"""Filters: each keeps the nodes that can take part and gives a reason for every one it drops."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from llamafleet.common.units import format_size
from llamafleet.controller.placement.nodes import NodeView, RpcServerView

# A new rpc-server process on a GPU creates its own CUDA context (and cuBLAS workspace) before
# it holds a byte of ours; NVML will show it only after the start, so placement books it first.
NEW_RPC_SERVER_GPU_BYTES = 512 * 2**20


@dataclass(frozen=True)
class FilterResult:
    survivors: list[NodeView]
    dropped: dict[str, str]  # node address → why


Filter = Callable[[Sequence[NodeView]], FilterResult]


def _split(nodes: Sequence[NodeView], why: Callable[[NodeView], str | None]) -> FilterResult:
    survivors, dropped = [], {}
    for node in nodes:
        reason = why(node)
        if reason is None:
            survivors.append(node)
        else:
            dropped[node.address] = reason
    return FilterResult(survivors, dropped)


def ready_nodes(nodes: Sequence[NodeView]) -> FilterResult:
    def why(node: NodeView) -> str | None:
        if node.state == "ready":
            return None
        if node.state == "maintenance":
            return "in maintenance (drained: no new placements)"
        return f"node is {node.state}"

    return _split(nodes, why)


def running_rpc_server(nodes: Sequence[NodeView]) -> FilterResult:
    def why(node: NodeView) -> str | None:
        if node.rpc_state == "running":
            return None
        return f"rpc-server is {node.rpc_state}" + (f" ({node.rpc_error})" if node.rpc_error else "")

    return _split(nodes, why)


def protocol_major(coordinator_version: str) -> Filter:
    """Backends must speak the coordinator's RPC protocol major version."""
    want = coordinator_version.split(".")[0]

    def why(node: NodeView) -> str | None:
        got = node.protocol_version.split(".")[0]
        if not node.protocol_version:
            return "rpc-server protocol version unknown"
        if got != want:
            return f"RPC protocol {node.protocol_version} differs from the coordinator's {coordinator_version} (major {got} ≠ {want})"
        return None

    return lambda nodes: _split(nodes, why)


def free_rpc_server(busy: Mapping[str, str]) -> Filter:
    """Give each node an rpc-server no loaded model holds (`busy`: endpoint → model).

    An rpc-server serves one coordinator at a time: a second one pointed at it waits until the
    first disconnects, so two models on a worker need two rpc-servers. A survivor carries its
    choice in `endpoint`/`rpc_index`: a running free one first, else a stopped slot the agent can
    start (with the new process's GPU context booked); a node whose every slot is held is dropped.
    """

    def choose(node: NodeView) -> NodeView | str:
        slots = _slots(node)
        for _, group in slots:
            if all(s.state == "running" and s.endpoint not in busy for s in group):
                return _on_slot(node, group, booked=())
        for number, group in slots:
            # Slot 0 is the agent's own (stopped there means stopped on purpose). A slot that is
            # partly running (per-device) is taken too: its stopped processes are started.
            startable = [s for s in group if s.state == "stopped"]
            if number > 0 and startable and all(s.endpoint not in busy and s.state in ("running", "stopped")
                                                for s in group):
                return _on_slot(node, group, booked=tuple(s.index for s in startable))
        servers = [s for _, group in slots for s in group]
        held = "; ".join(f"{s.endpoint} serves {busy[s.endpoint]}" if s.endpoint in busy else f"{s.endpoint} is {s.state}"
                         for s in servers)
        return f"no free rpc-server ({held}; an rpc-server serves one model at a time, the agent runs at most {len(slots)})"

    def keep(nodes: Sequence[NodeView]) -> FilterResult:
        survivors, dropped = [], {}
        for node in nodes:
            choice = choose(node)
            if isinstance(choice, str):
                dropped[node.address] = choice
            else:
                survivors.append(choice)
        return FilterResult(survivors, dropped)

    return keep


def _slots(node: NodeView) -> list[tuple[int, list[RpcServerView]]]:
    """The node's model slots in order, each its rpc-servers by index (one, or one per GPU)."""
    servers = node.rpc_servers or (RpcServerView(0, node.rpc_state, node.endpoint),)
    by_slot: dict[int, list[RpcServerView]] = {}
    for server in sorted(servers, key=lambda s: s.index):
        by_slot.setdefault(server.model_slot, []).append(server)
    # Every slot has as many rpc-servers as the first, whose devices placement splits over; one
    # with fewer (a list cut short by agent_bounds, which the node's error says) would put two
    # GPUs' layers on one rpc-server that serves only one of them, so it is never offered.
    size = len(by_slot.get(0, ()))
    return sorted((number, group) for number, group in by_slot.items() if not size or len(group) == size)


def _on_slot(node: NodeView, group: list[RpcServerView], booked: tuple[int, ...]) -> NodeView:
    """`node` placed on the rpc-servers `group`; the GPUs of those in `booked` (about to be
    started) lose a new process's CUDA context."""
    positions = {i for i, s in enumerate(group) if s.index in booked}
    devices = tuple(replace(d, free_bytes=max(d.free_bytes - NEW_RPC_SERVER_GPU_BYTES, 0))
                    if d.name != "CPU" and d.server in positions else d for d in node.devices)
    servers = tuple((s.endpoint, s.index) for s in group) if len(group) > 1 else ()
    return replace(node, endpoint=group[0].endpoint, rpc_index=group[0].index, devices=devices, slot_servers=servers)


def has_usable_memory(usable: Callable[[NodeView], int]) -> Filter:
    def why(node: NodeView) -> str | None:
        if not node.devices:
            return "reports no devices"
        if usable(node) <= 0:
            return f"no memory left after headroom ({format_size(node.free_bytes)} free)"
        return None

    return lambda nodes: _split(nodes, why)


def run_filters(nodes: Sequence[NodeView], filters: Sequence[Filter]) -> FilterResult:
    survivors, dropped = list(nodes), {}
    for keep in filters:
        result = keep(survivors)
        survivors = result.survivors
        dropped.update(result.dropped)
    return FilterResult(survivors, dropped)
