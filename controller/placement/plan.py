"""Choose the fewest workers that hold a model, and the `--tensor-split` that puts it there.

Deterministic for the same inputs. Nodes are ranked by usable memory (more first), then by
load (fewer models first), then by address; the plan takes the smallest prefix of that ranking
that holds the model, because every extra backend is one more network hop per token.

Within the chosen nodes the devices are ordered as llama.cpp orders them (RPC devices in `--rpc`
order); the node with the most room goes last, since the last device also holds the output
layer. Layers are split in proportion to each device's room, then checked byte by byte; the
split is given to llama.cpp as per-device layer counts (the output layer counted on the last
device), which makes llama.cpp's own rounding put every layer where the plan says.

Holders (issue 15): nodes whose models dir already holds the model's file. The number of nodes
is the primary objective and holders never raise it: k, the fewest nodes that hold the model by
the memory ranking, is found first, exactly as without holders. Plans of k nodes are then
"equally good", and among them the one with the most holders wins: for h from min(holders, k)
down, the h holders with the most room plus the k - h non-holders with the most room are tried,
and the first that fits is the plan. The memory-ranked prefix itself is one of these sets (its
holders are the top holders, its others the top others), so the search always ends at a plan no
worse than the one without holders, and with no holders it is that plan. Why holders before
memory: a holder loads its share from its own disk (with pre-staged caches, nothing crosses the
network), while the spare memory a bigger non-holder brings only matters if it decides the count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from llamafleet.common.units import format_size
from llamafleet.controller.estimate import MemoryEstimate
from llamafleet.controller.placement.filters import (
    Filter,
    FilterResult,
    free_rpc_server,
    has_usable_memory,
    protocol_major,
    ready_nodes,
    run_filters,
    running_rpc_server,
)
from llamafleet.controller.placement.nodes import DeviceView, NodeView

MIN_CTX = 256


@dataclass(frozen=True)
class Headroom:
    """Memory kept free on every device: a fraction of its total, at least `min_bytes`."""

    fraction: float = 0.05
    min_bytes: int = 0

    def of(self, device: DeviceView) -> int:
        return max(int(device.total_bytes * self.fraction), self.min_bytes)

    def usable(self, device: DeviceView) -> int:
        return device.free_bytes - self.of(device)


@dataclass(frozen=True)
class DeviceAssignment:
    node: str
    endpoint: str
    device: str
    first_layer: int
    layer_count: int
    weight_bytes: int
    kv_bytes: int
    output_bytes: int
    compute_bytes: int
    usable_bytes: int
    rpc_index: int = 0  # which of the node's rpc-servers `endpoint` is
    uuid: str = ""  # the GPU's NVML UUID ("" for a CPU or an unknown one)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.output_bytes + self.compute_bytes


@dataclass(frozen=True)
class Plan:
    model: str
    estimate: MemoryEstimate
    fits: bool
    assignments: list[DeviceAssignment] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # why it does not fit, and what would make it fit
    candidates: int = 0  # nodes that passed every filter (0: none can take part at all)
    holders: list[str] = field(default_factory=list)  # chosen nodes that hold the model's file
    holder_reason: str = ""  # how holders shaped the choice
    # Where the coordinator runs (controller/placement/coordinator.py): a chosen node, whose share
    # then comes first (a CPU) or last (GPUs) in the layer order, or "" for the controller's host; and why.
    coordinator: str = ""
    coordinator_reason: str = ""

    @property
    def remote_assignments(self) -> list[DeviceAssignment]:
        """The shares computed by rpc-servers: all but the coordinator's own node's."""
        return [a for a in self.assignments if a.node != self.coordinator]

    @property
    def backends(self) -> list[str]:
        """rpc-server endpoints in `--rpc` order."""
        seen: list[str] = []
        for a in self.remote_assignments:
            if a.endpoint not in seen:
                seen.append(a.endpoint)
        return seen

    @property
    def tensor_split(self) -> list[int]:
        """Per-device layer counts, the output layer counted on the last device."""
        counts = [a.layer_count for a in self.assignments]
        if counts:
            counts[-1] += 1
        return counts

    @property
    def local_split(self) -> list[int]:
        """The layer counts the coordinator's own node computes (with_coordinator_share puts them
        first or last in the layer order)."""
        return [n for a, n in zip(self.assignments, self.tensor_split, strict=True) if a.node == self.coordinator]

    @property
    def remote_split(self) -> list[int]:
        """`--tensor-split`: the layer counts of the rpc-servers, in `--rpc` order."""
        return [n for a, n in zip(self.assignments, self.tensor_split, strict=True) if a.node != self.coordinator]

    @property
    def local_last(self) -> bool:
        """The coordinator's own share comes after the rpc-servers' (and holds the output layer)."""
        return bool(self.coordinator) and self.assignments[-1].node == self.coordinator \
            and self.assignments[0].node != self.coordinator


def _devices_in_order(nodes: Sequence[NodeView], headroom: Headroom,
                      usable: dict[str, int]) -> list[tuple[NodeView, DeviceView, int]]:
    # The node with the most room last: it also holds the output layer.
    ordered = sorted(nodes, key=lambda n: (usable[n.address], n.address))
    return [(node, device, headroom.usable(device)) for node in ordered for device in node.devices]


def _usable(node: NodeView, headroom: Headroom) -> int:
    return sum(max(headroom.usable(d), 0) for d in node.devices)


def _assign(estimate: MemoryEstimate, devices: list[tuple[NodeView, DeviceView, int]]) -> list[DeviceAssignment] | None:
    """Contiguous layers per device, proportional to room; None if some device would overflow."""
    last = len(devices) - 1
    rooms = []
    for i, (_, _, usable) in enumerate(devices):
        room = usable - estimate.compute_bytes_per_device
        if i == last:
            room -= estimate.output_bytes + estimate.compute_bytes_output_device
        rooms.append(room)
    if rooms[last] < 0:
        return None
    counts = _proportional_counts(estimate, [max(r, 0) for r in rooms]) or _greedy_counts(estimate, rooms)
    if counts is None:
        return None
    out, layer = [], 0
    for i, ((node, device, usable), count) in enumerate(zip(devices, counts, strict=True)):
        weights = sum(estimate.layer_weight_bytes[layer : layer + count])
        kv = sum(estimate.kv_bytes_per_layer[layer : layer + count])
        is_last = i == last
        endpoint, rpc_index = node.server_of(device)
        out.append(DeviceAssignment(
            node=node.address, endpoint=endpoint, device=device.name, first_layer=layer, layer_count=count,
            weight_bytes=weights, kv_bytes=kv,
            output_bytes=estimate.output_bytes if is_last else 0,
            compute_bytes=estimate.compute_bytes_per_device + (estimate.compute_bytes_output_device if is_last else 0),
            usable_bytes=usable, rpc_index=rpc_index, uuid=device.uuid,
        ))
        layer += count
    return out


def _fits(estimate: MemoryEstimate, counts: list[int], rooms: list[int]) -> bool:
    layer = 0
    for count, room in zip(counts, rooms, strict=True):
        if sum(estimate.layer_bytes(i) for i in range(layer, layer + count)) > room:
            return False
        layer += count
    return layer == estimate.n_layers


def _proportional_counts(estimate: MemoryEstimate, rooms: list[int]) -> list[int] | None:
    total_room = sum(rooms)
    if total_room <= 0:
        return None
    counts, assigned, cumulative_room = [], 0, 0
    for room in rooms:
        cumulative_room += room
        upto = round(estimate.n_layers * cumulative_room / total_room)
        counts.append(max(upto - assigned, 0))
        assigned += counts[-1]
    return counts if _fits(estimate, counts, rooms) else None


def _greedy_counts(estimate: MemoryEstimate, rooms: list[int]) -> list[int] | None:
    counts, layer = [], 0
    for room in rooms:
        count, used = 0, 0
        while layer < estimate.n_layers and used + estimate.layer_bytes(layer) <= room:
            used += estimate.layer_bytes(layer)
            layer += 1
            count += 1
        counts.append(count)
    return counts if layer == estimate.n_layers else None


def make_plan(
    model: str,
    estimate: MemoryEstimate,
    nodes: Sequence[NodeView],
    coordinator_protocol: str | None,
    headroom: Headroom = Headroom(),
    estimate_for_ctx: Callable[[int], MemoryEstimate] | None = None,
    busy: Mapping[str, str] | None = None,
    max_nodes: int | None = None,
    holders: frozenset[str] = frozenset(),
) -> Plan:
    """`busy`: rpc-server endpoints other loaded models hold (endpoint → model): never shared.
    `max_nodes`: use no more nodes than this (more request slots must not cost a network hop).
    `holders`: addresses of nodes that hold the model's file (preferred; see the module doc)."""
    filters: list[Filter] = [ready_nodes, running_rpc_server]
    if coordinator_protocol is not None:  # unknown when the controller has no build yet
        filters.append(protocol_major(coordinator_protocol))
    filters.append(free_rpc_server(busy or {}))
    eligible = run_filters(nodes, filters)
    usable = {n.address: _usable(n, headroom) for n in eligible.survivors}  # used by every step below
    kept = run_filters(eligible.survivors, [has_usable_memory(lambda n: usable[n.address])])
    kept = FilterResult(kept.survivors, eligible.dropped | kept.dropped)
    ranked = sorted(kept.survivors, key=lambda n: (-usable[n.address], n.load, n.address))
    most = len(ranked) if max_nodes is None else min(max_nodes, len(ranked))
    for k in range(_fewest_that_could_hold(estimate, ranked, headroom), most + 1):
        assignments = _assign(estimate, _devices_in_order(ranked[:k], headroom, usable))
        if assignments is not None:
            chosen = ranked[:k]
            preferred = _prefer_holders(estimate, ranked, k, headroom, usable, holders) if holders else None
            if preferred is not None:
                chosen, assignments = preferred
            names = {n.address for n in chosen}
            excluded = dict(kept.dropped)
            for node in ranked:
                if node.address not in names:
                    excluded[node.address] = "not needed: fewer backends hold the model"
            held = [n.address for n in chosen if n.address in holders]
            return Plan(model, estimate, True, assignments, excluded, candidates=len(ranked), holders=held,
                        holder_reason=_holder_reason(held, k, ranked, holders, preferred is not None))
    return Plan(model, estimate, False, [], dict(kept.dropped),
                _why_not(estimate, ranked, headroom, usable, estimate_for_ctx), candidates=len(ranked))


def with_coordinator_share(plan: Plan, nodes: Sequence[NodeView], headroom: Headroom, node: str) -> Plan | None:
    """The plan's nodes with `node`'s devices moved to where a coordinator on `node` computes its
    share best, the others in the order they had; None when the model does not fit that way.

    GPUs go last: the last device holds the output layer, so the logits (n_vocab floats a token:
    513 KB for a 128k vocabulary, 4 ms on 1 GbE) never cross the network, only the hidden state
    does; measured on an H200 (bench/gpu/decode_paths.py) the local share last decoded at 0.83 of
    one GPU and first at 0.78. A CPU share goes first: llama.cpp keeps only the leading layers on
    the host (`--n-gpu-layers` offloads the rest, the output layer with them)."""
    if not plan.fits:
        return plan
    by_address = {n.address: n for n in nodes}
    if node not in by_address:
        return None
    current = list(dict.fromkeys(x.node for x in plan.assignments))
    others = [a for a in current if a != node]
    if any(a not in by_address for a in others):
        return None
    first, last = [node, *others], [*others, node]
    # GPUs: last if the output layer fits there, else first (still one hop fewer).
    orders = [last, first] if any(d.name != "CPU" for d in by_address[node].devices) else [first]
    for order in orders:
        if order == current:
            return plan
        devices = [(by_address[a], d, headroom.usable(d)) for a in order for d in by_address[a].devices]
        assignments = _assign(plan.estimate, devices)
        if assignments is not None:
            return replace(plan, assignments=assignments)
    return None


def _prefer_holders(estimate: MemoryEstimate, ranked: list[NodeView], k: int, headroom: Headroom,
                    usable: dict[str, int], holders: frozenset[str]) -> tuple[list[NodeView], list[DeviceAssignment]] | None:
    """The k-node set with the most holders that fits (see the module doc); None when that is
    the memory-ranked prefix itself."""
    held = [n for n in ranked if n.address in holders]
    others = [n for n in ranked if n.address not in holders]
    in_prefix = sum(1 for n in ranked[:k] if n.address in holders)
    for h in range(min(len(held), k), in_prefix, -1):
        chosen = held[:h] + others[: k - h]
        assignments = _assign(estimate, _devices_in_order(chosen, headroom, usable))
        if assignments is not None:
            return chosen, assignments
    return None


def _holder_reason(held: list[str], k: int, ranked: list[NodeView], holders: frozenset[str], moved: bool) -> str:
    usable_holders = sum(1 for n in ranked if n.address in holders)
    if not holders:
        return ""
    if not usable_holders:
        return "no node that holds the model can take part"
    text = f"{len(held)} of the {k} chosen node(s) hold the model"
    if moved:
        text += ": preferred over nodes with more room (same number of nodes)"
    elif len(held) < min(usable_holders, k):
        text += f"; using more of the {usable_holders} that do would need more nodes or does not fit"
    return text


def _fewest_that_could_hold(estimate: MemoryEstimate, ranked: list[NodeView], headroom: Headroom) -> int:
    """The smallest prefix of the ranking whose total room could hold the model (a necessary
    condition, cheap to check), so the byte-by-byte split is tried only from there; one past
    the end when even all of them could not."""
    need = estimate.layers_total + estimate.output_bytes + estimate.compute_bytes_output_device
    room = 0
    for k, node in enumerate(ranked, start=1):
        room += sum(max(headroom.usable(d) - estimate.compute_bytes_per_device, 0) for d in node.devices)
        if room >= need:
            return k
    return len(ranked) + 1


def _why_not(estimate: MemoryEstimate, ranked: list[NodeView], headroom: Headroom, usable: dict[str, int],
             estimate_for_ctx: Callable[[int], MemoryEstimate] | None) -> str:
    if not ranked:
        return "no node can take part (see the reasons for each)"
    offered = sum(usable[n.address] for n in ranked)
    need = estimate.device_total + estimate.compute_bytes_per_device * (sum(len(n.devices) for n in ranked) - 1)
    short = max(need - offered, 0)
    largest_device = max(headroom.usable(d) for n in ranked for d in n.devices)
    parts = [f"needs {format_size(need)} on the workers; the {len(ranked)} usable node(s) offer "
             f"{format_size(offered)} after headroom"]
    if short:
        parts.append(f"short by {format_size(short)}")
    if estimate.output_bytes + estimate.compute_bytes_per_device + estimate.compute_bytes_output_device > largest_device:
        parts.append(f"the output layer alone ({format_size(estimate.output_bytes)}) needs a device with more room "
                     f"than the largest ({format_size(largest_device)})")
    suggestions = []
    if estimate_for_ctx is not None:
        best = _largest_ctx_that_fits(estimate, ranked, headroom, usable, estimate_for_ctx)
        if best:
            suggestions.append(f"a context of at most {best} tokens")
    biggest = usable[ranked[0].address]
    if biggest > 0 and short:
        more = -(-short // biggest)
        suggestions.append(f"about {more} more node(s) like the largest")
    if suggestions:
        parts.append("it would fit with " + " or ".join(suggestions))
    return "; ".join(parts)


def _largest_ctx_that_fits(estimate: MemoryEstimate, ranked: list[NodeView], headroom: Headroom,
                           usable: dict[str, int], estimate_for_ctx: Callable[[int], MemoryEstimate]) -> int | None:
    devices = _devices_in_order(ranked, headroom, usable)
    low, high, best = MIN_CTX, estimate.ctx_per_slot - 1, None
    while low <= high:
        mid = (low + high) // 2
        if _assign(estimate_for_ctx(mid), devices) is not None:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best
