"""What the controller believes of an agent's status: clamped to sane bounds, or refused.

An agent may be compromised, or not an agent at all. Its status decides where model tensors
go and how much memory placement counts on, so before anything reads it, `bound_status`:

- caps every repeated field at `MAX_ITEMS` (10,000 devices become 64; model files at 1,024,
  rpc-servers at 1,024: 16 slots of one per GPU for 64 GPUs) and
  every string at `MAX_NAME_CHARS` (`MAX_TEXT_CHARS` for output lines, exit causes and paths);
- clamps every `*_bytes` field to `MAX_BYTES` and every free/used/available figure to its
  total (proto fields are uint64, so "negative" memory arrives as a number near 2^64);
- maps enum values this controller does not know to UNSPECIFIED (naming one would raise);
- refuses an rpc-server endpoint whose host is not the host of the node's address as the
  operator gave it: the rpc-server is then reported failed with no endpoint, which placement
  already drops. A wildcard (0.0.0.0) endpoint means "the agent's own host" and becomes that.

It is one pure function (resolution of the address is done by the caller, `address_ips`), and
the reason it returns is what `llamafleet nodes` shows as the node's error.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from llamafleet.common.settings import split_host_port
from llamafleet.common.wire_limits import MAX_RPC_SERVERS
from llamafleet.proto.v1 import agent_pb2 as pb

# 1 PiB: 40 times the RAM of the largest single hosts sold today, 5,000 times an H200's memory.
# Sums over MAX_ITEMS devices stay below 2^56, exact as floats and far from any integer limit.
MAX_BYTES = 2**50
MAX_ITEMS = 64
MAX_NAME_CHARS = 256
MAX_TEXT_CHARS = 1024
_TEXT_FIELDS = frozenset({"last_exit", "last_output", "recent_output", "path", "models_dir", "error"})
# Lists longer than MAX_ITEMS by design: an agent indexes up to 1,000 model files (agent/models.py),
# and with --rpc-layout per-device runs one rpc-server per GPU in each of up to MAX_RPC_SERVERS
# model slots (8 GPUs × 16 slots is 128 already): as many as MAX_ITEMS GPUs allow.
MAX_RPC_SERVER_ITEMS = MAX_RPC_SERVERS * MAX_ITEMS
_ITEM_LIMITS = {"models": 1024, "rpc_servers": MAX_RPC_SERVER_ITEMS}
# (total, part) pairs: the part can never exceed the total it is part of. Not used_bytes: under
# --memory-limit an honest agent reports the physical use beside the capped total, and
# placement never reads it.
_PARTS = (("total_bytes", "free_bytes"), ("total_bytes", "available_bytes"),
          ("physical_total_bytes", "physical_free_bytes"))


@dataclass(frozen=True)
class Bounded:
    status: pb.AgentStatus
    reason: str  # empty when the status was taken as it came
    refused: bool = False  # an rpc endpoint was refused


def bound_status(status: pb.AgentStatus, address: str, address_ips: frozenset[str] = frozenset()) -> Bounded:
    """`status` within bounds, and why it was changed. `address` is the node's address as the
    operator gave it; `address_ips` what its host resolves to (an IP literal resolves to itself)."""
    out = pb.AgentStatus()
    out.CopyFrom(status)
    clamps: dict[str, None] = {}  # ordered, without repeats
    _clamp(out, clamps)
    refusals: dict[str, None] = {}
    for rpc in _rpc_servers(out):
        why = _endpoint_refusal(rpc, address, address_ips)
        if why:
            refusals[why] = None
            rpc.endpoint = ""
            rpc.state = pb.RPC_SERVER_STATE_FAILED
    reason = ""
    if refusals:
        # What keeps the node out of placement first; what was merely clamped after.
        reason = "agent status refused: " + "; ".join([*refusals, *clamps])
    elif clamps:
        reason = "agent status clamped: " + "; ".join(clamps)
    return Bounded(out, reason, bool(refusals))


def _rpc_servers(status: pb.AgentStatus) -> Iterator[pb.RpcServerStatus]:
    yield status.rpc_server
    # Agents that run several rpc-servers list them all (a newer wire contract).
    if "rpc_servers" in status.DESCRIPTOR.fields_by_name:
        yield from status.rpc_servers


def _clamp(message: Message, notes: dict[str, None]) -> None:
    where = message.DESCRIPTOR.name
    for field in message.DESCRIPTOR.fields:
        name = field.name
        limit = MAX_TEXT_CHARS if name in _TEXT_FIELDS else MAX_NAME_CHARS
        if field.is_repeated:
            items = getattr(message, name)
            most = _ITEM_LIMITS.get(name, MAX_ITEMS)
            if len(items) > most:
                notes[f"{where}.{name}: {len(items)} reported, kept {most}"] = None
                del items[most:]
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                for item in items:
                    _clamp(item, notes)
            elif field.type == FieldDescriptor.TYPE_STRING:
                for index, text in enumerate(items):
                    if len(text) > limit:
                        notes[f"{where}.{name}: lines over {limit} characters cut"] = None
                        items[index] = text[:limit]
            continue
        value = getattr(message, name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(name):
                _clamp(value, notes)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if len(value) > limit:
                notes[f"{where}.{name}: {len(value)} characters, cut to {limit}"] = None
                setattr(message, name, value[:limit])
        elif field.type == FieldDescriptor.TYPE_ENUM:
            if field.enum_type is not None and value not in field.enum_type.values_by_number:
                notes[f"{where}.{name}: unknown value {value}"] = None
                setattr(message, name, 0)
        elif name.endswith("_bytes") and value > MAX_BYTES:
            notes[f"{where}.{name}: {value} above the {MAX_BYTES} maximum"] = None
            setattr(message, name, MAX_BYTES)
    fields = message.DESCRIPTOR.fields_by_name
    for total, part in _PARTS:
        if total in fields and part in fields and getattr(message, part) > getattr(message, total):
            notes[f"{where}.{part} above {total}"] = None
            setattr(message, part, getattr(message, total))


def _endpoint_refusal(rpc: pb.RpcServerStatus, address: str, address_ips: frozenset[str]) -> str:
    """Why `rpc.endpoint` may not be used ("" when it may); rewrites a wildcard host in place."""
    if not rpc.endpoint:
        return ""
    try:
        host, port = split_host_port(rpc.endpoint)
        own_host, _ = split_host_port(address)
    except ValueError:
        return f"rpc endpoint {rpc.endpoint!r} is not HOST:PORT"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # A name: only the very name the operator gave.
        return "" if host.lower() == own_host.lower() else f"rpc endpoint {rpc.endpoint} is not on {own_host}"
    if ip.is_unspecified:
        rpc.endpoint = f"{own_host}:{port}" if ":" not in own_host else f"[{own_host}]:{port}"
        return ""
    own = {ipaddress.ip_address(a) for a in address_ips}
    if ip in own:
        return ""
    if ip.is_loopback and own and all(a.is_loopback for a in own):
        # Every loopback address is this controller's own host: the operator named that host.
        return ""
    return f"rpc endpoint {rpc.endpoint} is not on {own_host}, the node's address"


async def address_ips(address: str) -> frozenset[str]:
    """What the host of `address` resolves to (itself, for an IP literal; empty when unresolvable)."""
    try:
        host, _ = split_host_port(address)
    except ValueError:
        return frozenset()
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass  # a name: resolve it below
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(str(ipaddress.ip_address(info[4][0])) for info in infos)
