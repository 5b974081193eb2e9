"""All coordinators of one controller: who is loaded where, and making room for the next.

The manager is the deployments' `Placer`. Placements happen one at a time, against the live
inventory minus the memory already promised to loaded models, so two loads never book the same
bytes. When a model does not fit beside the loaded ones but would fit alone, idle models are
unloaded, least recently used first (Ollama's swap); a model that does not fit even alone is
refused at once with the plan's reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.chat_template import builtin_template
from llamafleet.controller.coordinator.command import GENERATIVE_POOLING, Backend, CoordinatorSpec, LocalShare
from llamafleet.controller.coordinator.deployment import (
    Deployment,
    DoesNotFit,
    Runtime,
    ShuttingDown,
)
from llamafleet.controller.coordinator.remote import CoordinatorDoors
from llamafleet.controller.coordinator.states import CoordinatorState
from llamafleet.controller.coordinator.process import log_dir_name, numbered_logs
from llamafleet.controller.coordinator.reachability import RpcReachability
from llamafleet.controller.gateway.fairness import FairQueue
from llamafleet.controller.inventory import Inventory, rpc_server_at, rpc_state_name
from llamafleet.controller.models import ResolvedModel, parse_model_name
from llamafleet.controller.placement.nodes import device_key
from llamafleet.controller.placement.plan import DeviceAssignment, Plan
from llamafleet.controller.planner import Planner, plan_to_json
from llamafleet.controller.prestage import node_ranges
from llamafleet.controller.store import StateNotWritable, Store
from llamafleet.controller.tensor_hashes import HashFile, TensorHashes
from llamafleet.proto.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)
# How long a load waits for busy models to finish so that it can take their memory.
SWAP_WAIT_S = 300.0
SWAP_POLL_S = 0.25
# An extra rpc-server (a node's second, third… one) that no model used for this long is stopped:
# on a GPU each holds a CUDA context. Not at once, so a reload reuses it.
RPC_SERVER_IDLE_STOP_S = 15.0
# How long a started rpc-server may take to show up in the agent's reports.
RPC_SERVER_REPORT_S = 10.0
# How long a node may take to pre-stage its share (it reads and hashes its copy: a 40 GB share at
# ~1 GB/s is under a minute; past this the load goes over the network instead).
STAGE_TIMEOUT_S = 600.0
# How often nodes' reports are looked through for coordinators nobody here runs, and how long an
# exited one is left for its deployment to collect.
STRAY_CHECK_S = 2.0
STRAY_EXITED_S = 30.0
STRAY_STOP_CALL_S = 10.0


def assignment_doc(a: DeviceAssignment) -> dict[str, Any]:
    """Where one device's share of a model sits, as `ps --json`, events and the dashboard show it."""
    return {"node": a.node, "endpoint": a.endpoint, "device": a.device, "first_layer": a.first_layer,
            "layer_count": a.layer_count, "total_bytes": a.total_bytes, "output": bool(a.output_bytes),
            "rpc_index": a.rpc_index,
            # Which GPU: with --rpc-layout per-device every GPU is its own rpc-server's CUDA0.
            "uuid": a.uuid}


def canonical(model: str) -> str:
    """One key per model however it is spelled (`gemma3-270m` and `gemma3-270m:latest`)."""
    return parse_model_name(model).short


def does_not_fit(model: str, plan: Plan, most: int = 4) -> DoesNotFit:
    """The plan's reason, with why nodes were left out when that is the story."""
    dropped = [f"{node}: {why}" for node, why in sorted(plan.excluded.items()) if not why.startswith("not needed")]
    message = f"{model} does not fit: {plan.reason}"
    if dropped:
        more = f" and {len(dropped) - most} more" if len(dropped) > most else ""
        message += f" [left out: {'; '.join(dropped[:most])}{more}]"
    elif plan.candidates == 0:
        message += " [no nodes are known: add one with --agent or `llamafleet node add HOST:PORT`]"
    return DoesNotFit(message)


class CoordinatorManager:
    def __init__(self, planner: Planner, inventory: Inventory, store: Store, runtime: Runtime,
                 default_keep_alive_s: float, prompt_cache_mib: int = 0,
                 tensor_hashes: TensorHashes | None = None) -> None:
        self.planner = planner
        self.inventory = inventory
        self.store = store
        self.runtime = runtime
        self.default_keep_alive_s = default_keep_alive_s
        self.prompt_cache_mib = prompt_cache_mib
        self.tensor_hashes = tensor_hashes
        self._deployments: dict[str, Deployment] = {}
        self._plans: dict[str, Plan] = {}  # the plan each running coordinator was placed by
        self._placing = asyncio.Lock()
        self._idle_stops: set[asyncio.Task[None]] = set()
        self._queues: dict[str, FairQueue] = {}
        self._prestaged: dict[str, dict[str, Any]] = {}  # model → what its last placement pre-staged
        self.reachability = RpcReachability()
        self.closing = False

    def deployment(self, model: str) -> Deployment:
        key = canonical(model)
        if self.closing:
            raise ShuttingDown(f"not loading {key}: the controller is stopping")
        if key not in self._deployments:
            # Resolving first means a name that names nothing never gets a deployment.
            self.planner.models.resolve(model)
            self._deployments[key] = Deployment(key, self, self.runtime, self.default_keep_alive_s)
        return self._deployments[key]

    def queue(self, deployment: Deployment) -> FairQueue:
        """The turns at this model's slots (as many as its coordinator has)."""
        queue = self._queues.setdefault(deployment.model, FairQueue())
        if deployment.spec is not None and deployment.spec.parallel != queue.capacity:
            queue.resize(deployment.spec.parallel)
        return queue

    def queue_depth(self, model: str) -> int:
        queue = self._queues.get(model)
        return queue.depth if queue is not None else 0

    def find(self, model: str) -> Deployment | None:
        return self._deployments.get(canonical(model))

    def log_path(self, model: str) -> Path | None:
        """The running coordinator's log, else the newest one kept for the model."""
        try:
            key = canonical(model)
        except LlamafleetError:
            return None  # not a model name: there is no such log, and no path is built from it
        deployment = self._deployments.get(key)
        if deployment is not None and deployment.process is not None and deployment.process.log_path is not None:
            return deployment.process.log_path
        logs = numbered_logs(self.runtime.log_root / log_dir_name(key))
        return logs[-1][1] if logs else None

    def all(self) -> list[Deployment]:
        return [self._deployments[k] for k in sorted(self._deployments)]

    def loaded(self) -> Iterator[Deployment]:
        for key in sorted(self._deployments):
            deployment = self._deployments[key]
            if deployment.state is not CoordinatorState.STOPPED or deployment.running:
                yield deployment

    async def close(self) -> None:
        self.closing = True  # from now on nothing starts a coordinator
        await asyncio.gather(*(d.close() for d in self._deployments.values()))
        for task in self._idle_stops:
            task.cancel()
        self.reachability.close()

    async def reap_strays(self, doors: CoordinatorDoors) -> None:
        """Run forever (supervised): stop the coordinators nodes report that this controller does not
        run (it lost them to a partition, or restarted): each holds rpc-servers and memory."""
        while True:
            for record in self.inventory.records():
                if record.status is None or self.inventory.state(record) == "unreachable":
                    continue
                for c in record.status.coordinators:
                    exited_long_ago = (c.state == pb.COORDINATOR_STATE_EXITED
                                       and time.time() * 1000 - c.state_since_unix_ms > STRAY_EXITED_S * 1000)
                    if doors.known(c.id) or (c.state == pb.COORDINATOR_STATE_EXITED and not exited_long_ago):
                        continue
                    log.info("stopping the stray coordinator %s for %s on %s", c.id[:8], c.model, record.address)
                    try:
                        await self.inventory.stop_coordinator(record.address, c.id, STRAY_STOP_CALL_S)
                    except LlamafleetError as exc:
                        log.warning("could not stop the stray coordinator %s on %s: %s", c.id[:8], record.address,
                                    exc.message)
                        continue
                    self.runtime.events("coordinator.stray_stopped", record.address,
                                        f"stopped a coordinator for {c.model} this controller no longer runs",
                                        model=c.model)
            await asyncio.sleep(STRAY_CHECK_S)

    def serving(self) -> dict[str, str]:
        """rpc-server endpoint → the model whose coordinator holds it."""
        return {a.endpoint: model for model, plan in self._plans.items() for a in plan.remote_assignments}

    # ---- Placer -------------------------------------------------------------------------------

    def _reserved(self, excluding: str) -> tuple[dict[tuple[str, str], int], dict[str, int], dict[str, str]]:
        """What the other loaded models hold: bytes per (node, device), models per node, rpc-servers."""
        reserved: dict[tuple[str, str], int] = {}
        load: dict[str, int] = {}
        busy: dict[str, str] = {}
        for model, plan in self._plans.items():
            if model == excluding:
                continue
            for a in plan.assignments:
                key = (a.node, device_key(a.device, a.uuid))
                reserved[key] = reserved.get(key, 0) + a.total_bytes
            for a in plan.remote_assignments:
                busy[a.endpoint] = model
            for node in {a.node for a in plan.assignments}:
                load[node] = load.get(node, 0) + 1
        return reserved, load, busy

    async def place(self, model: str, ctx: int) -> CoordinatorSpec:
        resolved, plan, spec = await self._place(model, ctx)
        try:
            # Outside the placement lock: hashing and staging read files for seconds to minutes,
            # and other models' placements need not wait for them (this plan is booked already).
            # The tensor hashes first (all cores of this host, once per model file): the workers
            # then name their entries without reading their copy at all.
            hashes = await self._tensor_hashes(model, resolved, plan)
            await self._prestage_never_failing(model, resolved, plan, hashes.values if hashes else {})
        except asyncio.CancelledError:
            self.release(model)  # the deployment never saw the spec: nobody else would release it
            raise
        # A coordinator on a worker gets them with its start, whatever this host's build (the
        # worker's llama-server uses them if it has the patch); one here only with the patch.
        if hashes is None or (spec.local is None and not self.planner.coordinator_reads_hashes):
            return spec
        return dataclasses.replace(spec, tensor_hashes=hashes.path)

    async def _prestage_never_failing(self, model: str, resolved: ResolvedModel, plan: Plan,
                                      known: Mapping[tuple[int, int], int]) -> None:
        try:
            await self._prestage(model, resolved, plan, known)
        except Exception as exc:  # noqa: BLE001 - staging never fails a load, whatever it raised
            log.error("pre-staging %s failed unexpectedly: %r; loading over the network", model, exc, exc_info=exc)
            self.runtime.events("stage.failed", model, f"pre-staging failed: {exc!r}")

    async def _tensor_hashes(self, model: str, resolved: ResolvedModel, plan: Plan) -> HashFile | None:
        """The model's pre-computed tensor hashes (see controller/tensor_hashes.py), when someone uses
        them: a patched coordinator, or holders that pre-stage. None otherwise, or when they cannot
        be made: the coordinator and the agents then hash, as without them."""
        if self.tensor_hashes is None or not (self.planner.coordinator_reads_hashes or plan.holders):
            return None
        try:
            return await self.tensor_hashes.ensure(resolved.path, self.planner.header(resolved.path))
        except Exception as exc:  # noqa: BLE001 - the hashes only save time; a load never fails for them
            log.error("pre-computing tensor hashes of %s failed unexpectedly: %r", model, exc, exc_info=exc)
            return None

    async def _place(self, model: str, ctx: int) -> tuple[ResolvedModel, Plan, CoordinatorSpec]:
        try:
            await self.planner.read_header(model)
        except (LlamafleetError, OSError):
            pass  # said as the plan's own error just below, with the usual status
        async with self._placing:
            deadline = time.monotonic() + SWAP_WAIT_S
            while True:
                reserved, load, busy = self._reserved(excluding=model)
                resolved, plan, _ = self.planner.plan(model, ctx or None, reserved, load, busy)
                if plan.fits:
                    if plan.coordinator and self._local_share(resolved, plan) is None:
                        plan = dataclasses.replace(plan, coordinator="", coordinator_reason="on the controller: "
                                                   "the file's sha256 is not known yet")
                    generations = await self._start_rpc_servers(model, plan)
                    return resolved, plan, self._placed(model, resolved, plan, generations)
                if not reserved:
                    raise self._refused(model, plan)
                _, alone, _ = self.planner.plan(model, ctx or None)
                if not alone.fits:
                    raise self._refused(model, alone)
                victim = self._least_recently_used_idle(excluding=model)
                if victim is not None:
                    log.info("unloading %s to make room for %s", victim.model, model)
                    nodes = {a.node for a in self._plans[victim.model].assignments}
                    unloaded_at = time.monotonic()
                    await victim.unload(f"unloaded to make room for {model}")
                    await self._fresh_reports(nodes, unloaded_at)
                    continue
                if time.monotonic() > deadline:
                    message = f"{model} fits only after other models unload, and they stayed busy for {SWAP_WAIT_S:.0f}s"
                    self.runtime.events("placement.failed", model, message, reason="busy")
                    raise DoesNotFit(message)
                await asyncio.sleep(SWAP_POLL_S)

    def check(self, model: str, ctx: int) -> DoesNotFit | None:
        """Would `model` fit with `ctx` in place of its current placement? None when it would."""
        reserved, load, busy = self._reserved(excluding=model)
        _, plan, _ = self.planner.plan(model, ctx or None, reserved, load, busy)
        return None if plan.fits else self._refused(model, plan)

    def _refused(self, model: str, plan: Plan) -> DoesNotFit:
        error = does_not_fit(model, plan)
        reason = "no_nodes" if plan.candidates == 0 else "memory"
        self.runtime.events("placement.failed", model, error.message, reason=reason)
        return error

    async def _start_rpc_servers(self, model: str, plan: Plan) -> dict[str, int]:
        """Start the plan's rpc-servers that are not running yet; every backend's generation.

        If one cannot start, those this call started are stopped again after the idle grace
        (no plan holds them, so no release would)."""
        generations: dict[str, int] = {}
        started_here: set[tuple[str, int, str]] = set()
        try:
            for a in plan.remote_assignments:
                if a.endpoint not in generations:
                    generations[a.endpoint] = await self._running_rpc_server(model, a, started_here)
        except BaseException:
            self._stop_later(started_here, model)
            raise
        return generations

    async def _running_rpc_server(self, model: str, a: DeviceAssignment, started_here: set[tuple[str, int, str]]) -> int:
        """The generation of the assignment's rpc-server, started first when it is not running."""
        current = self.inventory.rpc_server(a.node, a.endpoint)
        if current is not None and current.state == pb.RPC_SERVER_STATE_RUNNING:
            return current.generation
        log.info("starting rpc-server #%d (%s) on %s for %s", a.rpc_index, a.endpoint, a.node, model)
        try:
            started = await self.inventory.set_rpc_server(a.node, a.rpc_index, running=True)
        except LlamafleetError as exc:
            raise DoesNotFit(f"{model}: could not start rpc-server {a.endpoint} on {a.node}: {exc.message}") from None
        if started.state != pb.RPC_SERVER_STATE_RUNNING:
            why = started.last_exit or rpc_state_name(started.state)
            raise DoesNotFit(f"{model}: rpc-server {a.endpoint} on {a.node} did not start: {why}")
        started_here.add((a.node, a.rpc_index, a.endpoint))
        self.runtime.events("rpc.started", a.node, f"rpc-server {a.endpoint} started for {model}",
                            index=a.rpc_index, generation=started.generation)
        await self._reported(a.node, a.endpoint, lambda r: r.generation >= started.generation)
        return started.generation

    async def _prestage(self, model: str, resolved: ResolvedModel, plan: Plan,
                        known: Mapping[tuple[int, int], int] | None = None) -> None:
        """Have every holder in the plan write the rpc cache entries of its share (see controller/prestage.py).

        Never fails the load: a node that cannot stage gets the bytes over the network, as without it."""
        self._prestaged[model] = {"bytes": 0, "seconds": 0.0, "nodes": {}}
        digests = self.planner.digests
        sha = digests.digest(resolved.path) if digests is not None and plan.holders else None
        if sha is None:
            return
        try:
            ranges = node_ranges(self.planner.header(resolved.path), plan.assignments)
        except (LlamafleetError, OSError) as exc:
            log.warning("cannot pre-stage %s: %s", model, exc)
            return
        started = time.monotonic()
        # The coordinator's own node reads its share from its file: nothing to stage there.
        nodes = [node for node in plan.holders if ranges.get(node) and node != plan.coordinator]
        # Which of its rpc-servers each node's share is for: the agent keeps those entries from
        # eviction while they serve the coordinator about to start. With the per-device layout a
        # node serves its GPUs through one rpc-server each, so a node may name several.
        slots: dict[str, list[int]] = {}
        for a in plan.remote_assignments:
            if a.rpc_index not in slots.setdefault(a.node, []):
                slots[a.node].append(a.rpc_index)
        done = await asyncio.gather(*(self._stage_node(model, node, sha, ranges[node], slots[node], known)
                                      for node in nodes))
        results = dict(zip(nodes, done, strict=True))
        self._prestaged[model] = {"bytes": sum(r.get("cached_bytes", 0) for r in results.values()),
                                  "seconds": round(time.monotonic() - started, 3), "nodes": results}

    async def _stage_node(self, model: str, node: str, sha: str, ranges: list[tuple[int, int]],
                          rpc_indexes: list[int], known: Mapping[tuple[int, int], int] | None = None) -> dict[str, Any]:
        try:
            reply = await self.inventory.stage_tensors(node, sha, ranges, STAGE_TIMEOUT_S, rpc_indexes, known)
        except LlamafleetError as exc:
            log.warning("pre-staging %s on %s failed; its share goes over the network: %s", model, node, exc.message)
            self.runtime.events("stage.failed", node, f"pre-staging {model} failed: {exc.message}", model=model)
            return {"error": exc.message}
        doc = {"staged": reply.staged, "present": reply.present, "rewritten": reply.rewritten,
               "referenced": reply.referenced,
               "skipped_small": reply.skipped_small, "bytes_written": reply.bytes_written,
               "cached_bytes": reply.cached_bytes, "seconds": round(reply.seconds, 3)}
        rewritten = f", {reply.rewritten} rewritten (truncated or corrupted)" if reply.rewritten else ""
        if reply.referenced:
            rewritten += f", {reply.referenced} of them references to the node's copy (nothing copied)"
        self.runtime.events("stage", node, f"pre-staged {model}: {reply.staged} entries written{rewritten}, "
                            f"{reply.present} present, {reply.cached_bytes} bytes in the cache in {reply.seconds:.2f}s",
                            model=model, **doc)
        return doc

    async def _reported(self, node: str, endpoint: str, shown: Callable[[pb.RpcServerStatus], bool]) -> None:
        """Wait until the node's reports show what the agent already answered about `endpoint`
        (the watch is another stream): a start's new generation, or else it would look like a
        restart to `backends_changed`; a stop, or else the next placement would take a dead one."""
        deadline = time.monotonic() + RPC_SERVER_REPORT_S
        while time.monotonic() < deadline:
            current = self.inventory.rpc_server(node, endpoint)
            if current is not None and shown(current):
                return
            await asyncio.sleep(0.05)

    def _placed(self, model: str, resolved: ResolvedModel, plan: Plan, generations: dict[str, int]) -> CoordinatorSpec:
        local = self._local_share(resolved, plan)
        endpoints = {a.endpoint: a.node for a in plan.remote_assignments}
        backends = tuple(Backend(node, endpoint, generations.get(endpoint, 0)) for endpoint, node in endpoints.items())
        try:
            # Recorded before it is booked: a restarted controller reloads what this says, and a
            # load it could not record is refused (with the disk's reason) rather than half-done.
            self.store.save_placement(model, plan_to_json(resolved, plan, [], self.planner.coordinator_protocol))
        except sqlite3.Error as exc:
            self._stop_later({(a.node, a.rpc_index, a.endpoint) for a in plan.remote_assignments}, model)
            raise StateNotWritable(f"not loading {model}: cannot record its placement in {self.store.path}: "
                                   f"{exc}") from None
        self._plans[model] = plan
        where = (f"coordinator on {plan.coordinator} with {sum(plan.local_split)} layer(s) of its own "
                 f"({'last, with the output layer' if plan.local_last else 'first'}), ") if local else ""
        self.runtime.events("placement", model, f"{where}on {len(backends)} backend(s): --rpc {','.join(endpoints)} "
                            f"--tensor-split {','.join(map(str, plan.remote_split))}",
                            backends=list(endpoints), tensor_split=plan.tensor_split, coordinator=plan.coordinator or "controller",
                            coordinator_reason=plan.coordinator_reason,
                            layers=[assignment_doc(a) for a in plan.assignments])
        e = plan.estimate
        # The header is the one the plan just read (the planner keeps it).
        header = self.planner.header(resolved.path)
        own_pooling = header.arch_key("pooling_type") is not None
        return CoordinatorSpec(model, resolved.path, backends, tuple(plan.remote_split), e.n_layers,
                               e.ctx_per_slot, e.parallel, self.prompt_cache_mib,
                               builtin_chat_template=builtin_template(header),
                               embedding_pooling="" if own_pooling else GENERATIVE_POOLING, local=local)

    def _local_share(self, resolved: ResolvedModel, plan: Plan) -> LocalShare | None:
        """The coordinator's own share when the plan puts it on a worker (first or last in layer order)."""
        if not plan.coordinator:
            return None
        digests = self.planner.digests
        sha = digests.digest(resolved.path) if digests is not None else None
        if sha is None:
            return None
        gpus = tuple(a.uuid for a in plan.assignments if a.node == plan.coordinator and a.device != "CPU")
        return LocalShare(plan.coordinator, gpus, tuple(plan.local_split), sha, last=plan.local_last)

    def release(self, model: str) -> None:
        self._prestaged.pop(model, None)
        plan = self._plans.pop(model, None)
        if plan is None:
            return
        try:
            self.store.remove_placement(model)
        except sqlite3.Error as exc:
            # The row only makes a restarted controller load the model again: not worth failing for.
            log.warning("cannot forget the placement of %s in %s: %s", model, self.store.path, exc)
        self._stop_later({(a.node, a.rpc_index, a.endpoint) for a in plan.remote_assignments}, model)

    def _stop_later(self, slots: set[tuple[str, int, str]], model: str) -> None:
        # Slot 0 is the agent's own: it starts them with itself and keeps them. With the
        # per-device layout that is rpc-servers #0 … #GPUs-1, not just #0.
        slots = {slot for slot in slots if self.inventory.model_slot(slot[0], slot[1]) > 0}
        if not slots:
            return
        task = asyncio.create_task(self._stop_when_idle(slots), name=f"stop idle rpc-servers of {model}")
        self._idle_stops.add(task)
        task.add_done_callback(self._idle_stop_done)

    async def _stop_when_idle(self, slots: set[tuple[str, int, str]]) -> None:
        await asyncio.sleep(RPC_SERVER_IDLE_STOP_S)
        async with self._placing:  # a placement meanwhile may have taken the slot again
            in_use = self.serving()
            for node, index, endpoint in sorted(slots):
                if endpoint in in_use or self.inventory.record(node) is None:
                    continue
                try:
                    await self.inventory.set_rpc_server(node, index, running=False)
                except LlamafleetError as exc:
                    # Left running: it costs memory, not correctness; the next release tries again.
                    log.warning("could not stop the idle rpc-server %s on %s: %s", endpoint, node, exc.message)
                    continue
                await self._reported(node, endpoint, lambda r: r.state != pb.RPC_SERVER_STATE_RUNNING)
                self.runtime.events("rpc.stopped", node, f"rpc-server {endpoint} stopped: no model used it for "
                                    f"{RPC_SERVER_IDLE_STOP_S:.0f}s", index=index)

    def _idle_stop_done(self, task: asyncio.Task[None]) -> None:
        self._idle_stops.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("stopping idle rpc-servers failed: %r", exc, exc_info=exc)
            self.runtime.events("rpc.stop_failed", "controller", f"stopping idle rpc-servers failed: {exc!r}")

    def backends_changed(self, spec: CoordinatorSpec) -> str | None:
        for backend in spec.backends:
            record = self.inventory.record(backend.node)
            if record is None:
                return f"node {backend.node} was removed"
            if self.inventory.state(record) != "unreachable":
                self.reachability.forget(backend.endpoint)
            elif self.reachability.gone(backend.endpoint):
                # A cut link: llama-server would wait on its RPC socket for ever (see reachability.py).
                return (f"node {backend.node} is unreachable and its rpc-server {backend.endpoint} accepts no "
                        "connection")
            if record.status is None:
                continue  # not heard from since a controller restart: the process will tell
            rpc = rpc_server_at(record.status, backend.endpoint)
            if rpc is None:
                return f"the rpc-server {backend.endpoint} is no longer reported by {backend.node}"
            if rpc.generation != backend.generation:
                return (f"the rpc-server on {backend.node} restarted (generation {backend.generation} → "
                        f"{rpc.generation}{': ' + rpc.last_exit if rpc.last_exit else ''})")
        return None

    def _least_recently_used_idle(self, excluding: str) -> Deployment | None:
        idle = [d for d in self._deployments.values()
                if d.model != excluding and d.model in self._plans and d.idle and d.state is CoordinatorState.READY]
        return min(idle, key=lambda d: d.last_used, default=None)

    async def _fresh_reports(self, nodes: set[str], since: float, timeout_s: float = 10.0) -> None:
        """Wait until every node reported after `since`, so its free memory no longer counts the unloaded model."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            records = [self.inventory.record(n) for n in nodes]
            if all(r is None or (r.last_heartbeat or 0) > since for r in records):
                return
            await asyncio.sleep(0.1)

    # ---- views --------------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """`llamafleet ps --json`: every coordinator that is not simply stopped."""
        out = []
        for d in self.loaded():
            plan = self._plans.get(d.model)
            expires = None
            if d.expires_at is not None:
                expires = time.time() + max(d.expires_at - time.monotonic(), 0)
            out.append({
                "model": d.model,
                "state": d.state.value,
                "detail": d.detail,
                "backends": d.spec.endpoints if d.spec else [],
                "nodes": list(dict.fromkeys(a.node for a in plan.assignments)) if plan else [],
                # Where llama-server runs: "controller", or the worker that computes its own share.
                "coordinator": d.spec.host if d.spec else None,
                "coordinator_reason": plan.coordinator_reason if plan else "",
                "tensor_split": list(d.spec.tensor_split) if d.spec else [],
                "assignments": [assignment_doc(a) for a in plan.assignments] if plan else [],
                "ctx": d.spec.ctx_per_slot if d.spec else None,
                "parallel": d.spec.parallel if d.spec else None,
                "size_bytes": sum(a.total_bytes for a in plan.assignments) if plan else 0,
                "gpu_bytes": sum(a.total_bytes for a in plan.assignments if a.device != "CPU") if plan else 0,
                "pid": d.process.pid if d.process else None,
                "url": d.process.url if d.process else None,  # loopback only: for debugging and benchmarks
                "state_since_unix_ms": int(d.state_since * 1000),
                "restarts": d.restarts,
                "last_exit": d.last_exit,
                "last_output": list(d.last_output),
                "load_duration_s": round(d.load_duration_s, 3),
                # Weight bytes the nodes' rpc caches held before the load (pre-staged or already
                # there): the coordinator sends none of them.
                "prestaged_bytes": self._prestaged.get(d.model, {}).get("bytes", 0),
                "prestage": self._prestaged.get(d.model),
                # The pre-computed tensor hashes a patched coordinator was given (None: it hashes itself).
                "tensor_hashes": str(d.spec.tensor_hashes) if d.spec and d.spec.tensor_hashes else None,
                "in_flight": d.active,
                "queued": self.queue_depth(d.model),
                "expires_at_unix": expires,
                "log": str(d.process.log_path) if d.process and d.process.log_path else None,
                # A full or read-only disk: the output is still read (the child never blocks), not kept.
                "log_lines_lost": d.process.log_lines_lost if d.process else 0,
                "log_error": d.process.log_error if d.process else "",
            })
        return out

