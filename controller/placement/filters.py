"""Filters: each keeps the nodes that can take part and gives a reason for every one it drops."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llamafleet.common.units import format_size
from llamafleet.controller.placement.nodes import NodeView


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
    return _split(nodes, lambda n: None if n.rpc_state == "running" else f"rpc-server is {n.rpc_state}")


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
