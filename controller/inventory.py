"""The set of agents the controller knows, each watched through one WatchStatus stream.

A node is `ready` while its heartbeats arrive, `unreachable` once none came for
`missed_heartbeats × heartbeat_interval`, and `maintenance` when the operator drained it
(it stays watched, but takes no new placements). Membership and maintenance persist in SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from llamafleet.common.settings import split_host_port
from llamafleet.common.agent_client import AgentAddress, AgentCallError, aio_channel, describe_rpc_error
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.proto_json import message_to_json
from llamafleet.common.restart import RestartPolicy
from llamafleet.common.supervised import Supervised, TaskFailure
from llamafleet.controller.agent_bounds import address_ips, bound_status
from llamafleet.controller.credentials import WATCH_METHOD, method_path
from llamafleet.controller.events import EventSink, no_events
from llamafleet.controller.gpu_shares import GpuShare, gpu_shares
from llamafleet.controller.placement.nodes import DeviceView, ModelFileView, NodeView, RpcServerView
from llamafleet.controller.store import Store
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
RECONNECT_MAX_S = 5.0
_CUDA = re.compile(r"^CUDA(\d+)$")
_CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                    ("grpc.keepalive_permit_without_calls", 1)]
# The watch dials a fresh channel each time and paces itself; gRPC's own reconnect back-off
# (1 s growing to 120 s, with a 20 s floor on each connect attempt) would otherwise keep a node
# that came back after a partition unwatched for up to a minute. A connect attempt into a
# partition now gives up after a second and the loop's own capped delay decides the next one.
_WATCH_CHANNEL_OPTIONS = [*_CHANNEL_OPTIONS, ("grpc.initial_reconnect_backoff_ms", 200),
                          ("grpc.min_reconnect_backoff_ms", 1_000), ("grpc.max_reconnect_backoff_ms", 1_000)]
# A watcher or the transition monitor that raised what nobody expected runs again, for as long
# as the controller runs, after a capped back-off: a node is never left unwatched for good.
WATCH_RESTART = RestartPolicy(initial_s=0.5, max_s=RECONNECT_MAX_S * 2, max_failures=1_000_000, healthy_reset_s=60.0)


@dataclass
class NodeRecord:
    address: str
    maintenance: bool = False
    status: pb.AgentStatus | None = None
    last_heartbeat: float | None = None  # monotonic
    last_seen_unix_ms: int = 0
    error: str = ""
    task: Supervised | None = field(default=None, repr=False)


def validate_address(address: str) -> str:
    try:
        split_host_port(address)
    except ValueError as exc:
        raise UsageError(f"invalid agent address: {exc}") from None
    return address


def node_view(address: str, state: str, status: pb.AgentStatus | None, load: int = 0,
              shares: Mapping[str, GpuShare] | None = None) -> NodeView:
    """What placement needs from an agent's status: the devices of its first slot's rpc-server(s),
    each GPU matched to NVML's report by UUID (`shares`: this node's part of GPUs other agents
    advertise too, by UUID; see gpu_shares.py)."""
    if status is None:
        return NodeView(address, state, "unknown", "", "", (), load)
    rpc = status.rpc_server
    by_uuid = {d.uuid: d for d in status.devices if d.kind == pb.DEVICE_KIND_GPU and d.uuid}
    by_index = {d.index: d for d in status.devices if d.kind == pb.DEVICE_KIND_GPU}
    cpu = next((d for d in status.devices if d.kind == pb.DEVICE_KIND_CPU), None)
    cap = status.memory_limit_bytes or None
    shares = shares or {}
    servers = tuple(RpcServerView(r.index, rpc_state_name(r.state), r.endpoint,
                                  r.slot if status.rpc_layout else None) for r in rpc_servers(status))
    first_slot = [r for r, view in zip(rpc_servers(status), servers, strict=True) if view.model_slot == 0]
    devices = []
    for position, server in enumerate(sorted(first_slot, key=lambda r: r.index)):
        for device in server.devices:
            if device.name == "CPU":
                live = cpu
            elif device.uuid:
                live = by_uuid.get(device.uuid)
            elif not status.rpc_layout and (match := _CUDA.match(device.name)):
                # An agent from before the pin: its CUDAn was NVML's index n (right only when
                # nothing reordered them).
                live = by_index.get(int(match.group(1)))
            else:
                live = None
            if live is not None:
                total, free = live.total_bytes, live.free_bytes
                if (share := shares.get(live.uuid)) is not None:
                    total, free = share.total_bytes, share.free_bytes
                devices.append(DeviceView(device.name, total, free, live.uuid, position))
            else:
                # A backend NVML does not see (Metal, Vulkan…): the banner's numbers, capped.
                devices.append(DeviceView(device.name, min(device.total_bytes, cap or device.total_bytes),
                                          min(device.free_bytes, cap or device.free_bytes), "", position))
    # The node runs when every rpc-server of its first slot does (one is one GPU of it).
    down = [r for r in first_slot or [rpc] if r.state != pb.RPC_SERVER_STATE_RUNNING]
    rpc_state = rpc_state_name(down[0].state) if down else "running"
    # The agent's own words for it (a GPU identity mismatch, a crash): placement says them.
    rpc_error = next((f"rpc-server {r.endpoint or '#' + str(r.index)}: {r.last_exit}" for r in down if r.last_exit), "")
    files = tuple(ModelFileView(m.name, m.size_bytes, m.sha256 if m.state == pb.MODEL_FILE_STATE_READY else "")
                  for m in status.models)
    return NodeView(address, state, rpc_state, rpc.endpoint,
                    rpc.protocol_version or status.build.rpc_protocol_version, tuple(devices), load,
                    servers, model_files=files, rpc_error=rpc_error)


def rpc_state_name(state: int) -> str:
    return pb.RpcServerState.Name(state).removeprefix("RPC_SERVER_STATE_").lower()


def rpc_servers(status: pb.AgentStatus) -> list[pb.RpcServerStatus]:
    """Every rpc-server the agent reports (an agent from before `rpc_servers` has only the one)."""
    return list(status.rpc_servers) or [status.rpc_server]


def rpc_server_at(status: pb.AgentStatus, endpoint: str) -> pb.RpcServerStatus | None:
    return next((r for r in rpc_servers(status) if r.endpoint == endpoint), None)


class Inventory:
    def __init__(self, store: Store, target: Callable[[str], AgentAddress], heartbeat_s: float,
                 unreachable_after_s: float, clock: Callable[[], float] = time.monotonic,
                 events: EventSink = no_events) -> None:
        self._store = store
        self._events = events
        self._target = target
        self._heartbeat_s = heartbeat_s
        self._unreachable_after_s = unreachable_after_s
        self._clock = clock
        self._nodes: dict[str, NodeRecord] = {}
        self._states: dict[str, str] = {}
        self._monitor: Supervised | None = None

    async def start(self, extra_agents: tuple[str, ...] = ()) -> None:
        for address in extra_agents:
            self._store.add_node(validate_address(address))
        for address, maintenance in self._store.nodes():
            self._watch(NodeRecord(address, maintenance))
        self._monitor = Supervised("node transition monitor", self._log_transitions, restart=WATCH_RESTART,
                                   events=self._events, subject="controller")

    async def close(self) -> None:
        tasks = [r.task for r in self._nodes.values() if r.task] + ([self._monitor] if self._monitor else [])
        await asyncio.gather(*(task.stop() for task in tasks))

    def _watch(self, record: NodeRecord) -> None:
        self._nodes[record.address] = record
        self._start_watcher(record)

    def _start_watcher(self, record: NodeRecord) -> None:
        def failed(failure: TaskFailure, exc: Exception) -> None:
            # Shown by `llamafleet nodes`; the heartbeats stop, so the node turns unreachable meanwhile.
            record.error = f"watching {record.address} failed: {failure.cause}"

        record.task = Supervised(f"watcher of {record.address}", lambda: self._watch_loop(record),
                                 on_failure=failed, restart=WATCH_RESTART, events=self._events,
                                 subject=record.address)

    # ---- membership ---------------------------------------------------------------------------

    def add(self, address: str) -> bool:
        validate_address(address)
        if address in self._nodes:
            return False
        self._store.add_node(address)
        self._watch(NodeRecord(address))
        self._events("node.added", address, "added to the fleet")
        return True

    async def remove(self, address: str) -> bool:
        record = self._nodes.pop(address, None)
        if record is None:
            return False
        self._store.remove_node(address)
        self._events("node.removed", address, "removed from the fleet")
        if record.task is not None:
            await record.task.stop()
        return True

    async def redial(self, address: str) -> None:
        """Watch `address` anew (its credential changed), keeping what is known of it."""
        record = self._nodes.get(address)
        if record is None:
            return
        if record.task is not None:
            await record.task.stop()
        self._start_watcher(record)

    def set_maintenance(self, address: str, enabled: bool) -> bool:
        record = self._nodes.get(address)
        if record is None:
            return False
        record.maintenance = enabled
        self._store.set_maintenance(address, enabled)
        return True

    # ---- views --------------------------------------------------------------------------------

    def state(self, record: NodeRecord) -> str:
        if record.maintenance:
            return "maintenance"
        fresh = record.last_heartbeat is not None and self._clock() - record.last_heartbeat <= self._unreachable_after_s
        return "ready" if fresh else "unreachable"

    def record(self, address: str) -> NodeRecord | None:
        return self._nodes.get(address)

    def records(self) -> list[NodeRecord]:
        return [self._nodes[a] for a in sorted(self._nodes)]

    def describe(self) -> list[dict[str, Any]]:
        """`llamafleet nodes --json`: address, state, and the agent's last status fields."""
        out = []
        shares = self.gpu_shares()
        for record in self.records():
            failure = record.task.failure if record.task is not None else None
            doc: dict[str, Any] = {"address": record.address, "state": self.state(record),
                                   "error": record.error, "last_seen_unix_ms": record.last_seen_unix_ms,
                                   # The watcher's last unexpected failure (None: it never had one).
                                   "watch_failure": failure.to_json() if failure is not None else None}
            status = message_to_json(record.status) if record.status is not None else {}
            for key in ("node", "build", "rpc_server", "rpc_servers", "devices", "host", "memory_limit_bytes",
                        "models", "models_omitted", "models_dir", "rpc_cache", "rpc_layout"):
                doc[key] = status.get(key)
            # A GPU another agent advertises too is counted once across the fleet: say how.
            doc["gpu_shares"] = [share.doc() for share in shares.get(record.address, {}).values()]
            out.append(doc)
        return out

    def gpu_shares(self) -> dict[str, dict[str, GpuShare]]:
        """GPUs more than one agent advertises: each node's share, by address and UUID."""
        return gpu_shares({r.address: r.status for r in self.records() if r.status is not None})

    def node_views(self, load: dict[str, int] | None = None) -> list[NodeView]:
        load = load or {}
        shares = self.gpu_shares()
        return [node_view(r.address, self.state(r), r.status, load.get(r.address, 0), shares.get(r.address))
                for r in self.records()]

    # ---- watching -----------------------------------------------------------------------------

    async def _watch_loop(self, record: NodeRecord) -> None:
        delay = 0.2
        request = pb.WatchStatusRequest(heartbeat_interval_ms=int(self._heartbeat_s * 1000))
        while True:
            # Asked at every dial: a credential that arrived (a join) or changed (a rotation) counts.
            target = self._target(record.address)
            if not target.token:
                # Nothing is sent to an endpoint we hold no credential for: not even a dial.
                record.error = target.missing
                await asyncio.sleep(RECONNECT_MAX_S)
                continue
            own_ips = await address_ips(record.address)
            try:
                channel = aio_channel(target, _WATCH_CHANNEL_OPTIONS)
            except LlamafleetError as exc:
                # An unreadable TLS file: say so on the node and try again later (it may be fixed).
                record.error = exc.message
                await asyncio.sleep(RECONNECT_MAX_S)
                continue
            try:
                call = pb_grpc.AgentServiceStub(channel).WatchStatus(request, metadata=target.metadata_for(WATCH_METHOD))
                while True:
                    # A stream that stays silent far past the grace is dead (a half-open
                    # connection): drop it and dial again.
                    message = await asyncio.wait_for(call.read(), timeout=self._unreachable_after_s * 3)
                    if message is grpc.aio.EOF:
                        raise ConnectionError("agent closed the stream")
                    # The agent may lie: what it says is clamped, or refused, before anyone reads it.
                    bounded = bound_status(message.status, record.address, own_ips)
                    self._note_restart(record, bounded.status)
                    record.status = bounded.status
                    record.last_heartbeat = self._clock()
                    record.last_seen_unix_ms = int(time.time() * 1000)
                    record.error = bounded.reason
                    delay = 0.2
            except grpc.aio.AioRpcError as exc:
                # The agent is down, refuses us, or the network failed: record why and redial.
                record.error = describe_rpc_error(record.address, exc).message
            except (TimeoutError, ConnectionError) as exc:
                record.error = f"agent at {record.address}: {exc or 'no message within the grace'}"
            finally:
                await channel.close()
            await asyncio.sleep(delay)
            # Capped at one heartbeat: a node back from a partition is ready within one of its return.
            delay = min(delay * 2, max(min(self._heartbeat_s, RECONNECT_MAX_S), 0.2))

    def _note_restart(self, record: NodeRecord, status: pb.AgentStatus) -> None:
        if record.status is None:
            return
        before = {r.index: r for r in rpc_servers(record.status)}
        for after in rpc_servers(status):
            old = before.get(after.index)
            # An unplanned restart only (the agent counts those): a slot the controller started
            # or stopped on purpose changes its generation but is no crash.
            if old is not None and after.restarts > old.restarts:
                cause = after.last_exit or "restarted"
                self._events("rpc.restarted", record.address, f"rpc-server {after.endpoint} restarted: {cause}",
                             generation=after.generation, restarts=after.restarts, index=after.index,
                             last_output=list(after.last_output)[-5:])

    # ---- asking an agent ----------------------------------------------------------------------

    def rpc_server(self, address: str, endpoint: str) -> pb.RpcServerStatus | None:
        """What the node last reported of its rpc-server at `endpoint` (None: not heard of)."""
        record = self._nodes.get(address)
        return rpc_server_at(record.status, endpoint) if record is not None and record.status else None

    def model_slot(self, address: str, index: int) -> int:
        """Which model slot rpc-server #`index` of a node serves in: its index with the shared
        layout (and for agents from before the layouts), `index // GPUs` with per-device."""
        record = self._nodes.get(address)
        if record is None or record.status is None or not record.status.rpc_layout:
            return index
        rpc = next((r for r in rpc_servers(record.status) if r.index == index), None)
        return rpc.slot if rpc is not None else index

    async def set_rpc_server(self, address: str, index: int, running: bool, timeout_s: float = 45.0) -> pb.RpcServerStatus:
        """Start or stop one of a node's rpc-servers; answers once the agent says it settled."""
        if running:
            started = await self._call(address, "StartRpcServer", pb.StartRpcServerRequest(index=index), timeout_s)
            return started.rpc_server
        stopped = await self._call(address, "StopRpcServer", pb.StopRpcServerRequest(index=index), timeout_s)
        return stopped.rpc_server

    async def restart_rpc_server(self, address: str, index: int, timeout_s: float = 45.0) -> pb.RpcServerStatus:
        restarted = await self._call(address, "RestartRpcServer", pb.RestartRpcServerRequest(index=index), timeout_s)
        return restarted.rpc_server

    async def start_coordinator(self, address: str, request: pb.StartCoordinatorRequest,
                                timeout_s: float = 30.0) -> pb.CoordinatorStatus:
        """Have a node's agent run a model's coordinator (it answers once llama-server is spawned)."""
        reply: pb.StartCoordinatorResponse = await self._call(address, "StartCoordinator", request, timeout_s)
        return reply.coordinator

    async def stop_coordinator(self, address: str, coordinator_id: str, timeout_s: float = 30.0) -> pb.CoordinatorStatus:
        reply: pb.StopCoordinatorResponse = await self._call(address, "StopCoordinator",
                                                             pb.StopCoordinatorRequest(id=coordinator_id), timeout_s)
        return reply.coordinator

    def coordinator(self, address: str, coordinator_id: str) -> pb.CoordinatorStatus | None:
        """What the node last reported of that coordinator (None: not in its reports)."""
        record = self._nodes.get(address)
        if record is None or record.status is None:
            return None
        return next((c for c in record.status.coordinators if c.id == coordinator_id), None)

    def node_secret(self, address: str) -> str:
        """The credential the controller proves itself with to that node ("" when it has none)."""
        return self._target(address).token

    async def stage_tensors(self, address: str, sha256: str, ranges: list[tuple[int, int]],
                            timeout_s: float, rpc_server_indexes: Sequence[int] = (),
                            known: Mapping[tuple[int, int], int] | None = None) -> pb.StageTensorsResponse:
        """Ask a node's agent to write the rpc cache entries of (offset, size) ranges of its copy of a
        model; `rpc_server_indexes`: the node's rpc-servers whose coordinator uses them (kept from
        eviction meanwhile; one per GPU with the per-device layout); `known`: the FNV-1a of ranges
        the controller computed already (the agent then need not read them)."""
        known = known or {}
        indexes = sorted(set(rpc_server_indexes))
        request = pb.StageTensorsRequest(sha256=sha256, ranges=[
            pb.ByteRange(offset=o, size=n, fnv1a=known[(o, n)]) if (o, n) in known else pb.ByteRange(offset=o, size=n)
            for o, n in ranges], rpc_server_index=indexes[0] if indexes else None,
            # An agent older than the list reads only the first: that rpc-server stays protected.
            rpc_server_indexes=indexes)
        reply: pb.StageTensorsResponse = await self._call(address, "StageTensors", request, timeout_s)
        return reply

    async def prepare_push(self, address: str, name: str, sha256: str, size_bytes: int,
                           timeout_s: float) -> pb.PrepareModelPushResponse:
        """Ask a node whether it holds a model file already, and from which byte a push of it resumes."""
        request = pb.PrepareModelPushRequest(name=name, sha256=sha256, size_bytes=size_bytes)
        reply: pb.PrepareModelPushResponse = await self._call(address, "PrepareModelPush", request, timeout_s)
        return reply

    async def push_model(self, address: str, header: pb.PushModelHeader, data: Callable[[int], AsyncGenerator[bytes]],
                         sent: Callable[[int], None]) -> pb.PushModelDone:
        """Stream a model file into a node's models dir: the header, then, once the agent accepted it,
        `data(offset)`; `sent` is told each chunk's size once gRPC has taken it. No deadline: a large
        file takes minutes, and the channel's keepalive notices a peer that went away."""
        target = self._target(address)
        if not target.token:
            raise AgentCallError(f"agent at {address}: {target.missing}")
        channel = aio_channel(target, _CHANNEL_OPTIONS)
        try:
            call = pb_grpc.AgentServiceStub(channel).PushModel(metadata=target.metadata_for(method_path("PushModel")))
            await call.write(pb.PushModelRequest(header=header))
            answer = await call.read()
            if answer is grpc.aio.EOF:
                raise AgentCallError(f"agent at {address} ended the push without an answer")
            if answer.WhichOneof("event") == "done":  # held already: nothing to send
                return answer.done
            try:
                async with contextlib.aclosing(data(answer.accepted.offset)) as chunks:
                    async for chunk in chunks:
                        await call.write(pb.PushModelRequest(data=chunk))
                        sent(len(chunk))
                await call.done_writing()
            except asyncio.InvalidStateError:
                pass  # the agent ended the push before the last byte: its status says why, below
            answer = await call.read()
            if answer is grpc.aio.EOF or answer.WhichOneof("event") != "done":
                raise AgentCallError(f"agent at {address} ended the push without saying it was done")
            return answer.done
        except grpc.aio.AioRpcError as exc:
            raise describe_rpc_error(address, exc) from None
        finally:
            await channel.close()  # also cancels the call when we stop part-way (the agent keeps its bytes)

    async def _call(self, address: str, method: str, request: Message, timeout_s: float) -> Any:
        """One unary call of the node's agent, with the node's own proof for that method; an
        AgentCallError (one line) when it has no credential, is unreachable or refuses."""
        target = self._target(address)
        if not target.token:
            raise AgentCallError(f"agent at {address}: {target.missing}")
        channel = aio_channel(target, _CHANNEL_OPTIONS)
        try:
            call = getattr(pb_grpc.AgentServiceStub(channel), method)
            return await call(request, metadata=target.metadata_for(method_path(method)), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise describe_rpc_error(address, exc) from None
        finally:
            await channel.close()

    async def _log_transitions(self) -> None:
        while True:
            for record in self.records():
                state = self.state(record)
                if self._states.get(record.address) != state:
                    why = f" ({record.error})" if record.error and state == "unreachable" else ""
                    if record.address in self._states:
                        log.info("node %s: %s → %s%s", record.address, self._states[record.address], state, why)
                    if record.address in self._states or state != "unreachable":
                        self._events(f"node.{state}", record.address, f"node is {state}{why}")
                    self._states[record.address] = state
            await asyncio.sleep(min(self._heartbeat_s / 2, 0.5))
