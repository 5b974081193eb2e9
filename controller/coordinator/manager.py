"""All coordinators of one controller: who is loaded where, and making room for the next.

The manager is the deployments' `Placer`. Placements happen one at a time, against the live
inventory minus the memory already promised to loaded models, so two loads never book the same
bytes. When a model does not fit beside the loaded ones but would fit alone, idle models are
unloaded, least recently used first (Ollama's swap); a model that does not fit even alone is
refused at once with the plan's reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.coordinator.command import Backend, CoordinatorSpec
from llamafleet.controller.coordinator.deployment import (
    CoordinatorState,
    Deployment,
    DoesNotFit,
    Runtime,
)
from llamafleet.controller.coordinator.process import log_dir_name, numbered_logs
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.models import ResolvedModel, parse_model_name
from llamafleet.controller.placement.plan import DeviceAssignment, Plan
from llamafleet.controller.planner import Planner, plan_to_json
from llamafleet.controller.store import Store

log = logging.getLogger(__name__)
# How long a load waits for busy models to finish so that it can take their memory.
SWAP_WAIT_S = 300.0
SWAP_POLL_S = 0.25


def assignment_doc(a: DeviceAssignment) -> dict[str, Any]:
    """Where one device's share of a model sits, as `ps --json`, events and the dashboard show it."""
    return {"node": a.node, "endpoint": a.endpoint, "device": a.device, "first_layer": a.first_layer,
            "layer_count": a.layer_count, "total_bytes": a.total_bytes, "output": bool(a.output_bytes)}


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
                 default_keep_alive_s: float) -> None:
        self.planner = planner
        self.inventory = inventory
        self.store = store
        self.runtime = runtime
        self.default_keep_alive_s = default_keep_alive_s
        self._deployments: dict[str, Deployment] = {}
        self._plans: dict[str, Plan] = {}  # the plan each running coordinator was placed by
        self._placing = asyncio.Lock()

    def deployment(self, model: str) -> Deployment:
        key = canonical(model)
        if key not in self._deployments:
            # Resolving first means a name that names nothing never gets a deployment.
            self.planner.models.resolve(model)
            self._deployments[key] = Deployment(key, self, self.runtime, self.default_keep_alive_s)
        return self._deployments[key]

    def find(self, model: str) -> Deployment | None:
        return self._deployments.get(canonical(model))

    def log_path(self, model: str) -> Path | None:
        """The running coordinator's log, else the newest one kept for the model."""
        try:
            key = canonical(model)
        except LlamafleetError:
            return None  # not a model name: there is no such log, and no path is built from it
        deployment = self._deployments.get(key)
        if deployment is not None and deployment.process is not None:
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
        await asyncio.gather(*(d.close() for d in self._deployments.values()))

    # ---- Placer -------------------------------------------------------------------------------

    def _reserved(self, excluding: str) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
        reserved: dict[tuple[str, str], int] = {}
        load: dict[str, int] = {}
        for model, plan in self._plans.items():
            if model == excluding:
                continue
            for a in plan.assignments:
                reserved[(a.node, a.device)] = reserved.get((a.node, a.device), 0) + a.total_bytes
            for node in {a.node for a in plan.assignments}:
                load[node] = load.get(node, 0) + 1
        return reserved, load

    async def place(self, model: str, ctx: int) -> CoordinatorSpec:
        async with self._placing:
            deadline = time.monotonic() + SWAP_WAIT_S
            while True:
                reserved, load = self._reserved(excluding=model)
                resolved, plan, _ = self.planner.plan(model, ctx or None, reserved, load)
                if plan.fits:
                    return self._placed(model, resolved, plan)
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
        reserved, load = self._reserved(excluding=model)
        _, plan, _ = self.planner.plan(model, ctx or None, reserved, load)
        return None if plan.fits else self._refused(model, plan)

    def _refused(self, model: str, plan: Plan) -> DoesNotFit:
        error = does_not_fit(model, plan)
        reason = "no_nodes" if plan.candidates == 0 else "memory"
        self.runtime.events("placement.failed", model, error.message, reason=reason)
        return error

    def _placed(self, model: str, resolved: ResolvedModel, plan: Plan) -> CoordinatorSpec:
        generations = {v.address: v.generation for v in self.inventory.node_views()}
        endpoints = {a.endpoint: a.node for a in plan.assignments}
        backends = tuple(Backend(node, endpoint, generations.get(node, 0)) for endpoint, node in endpoints.items())
        self._plans[model] = plan
        self.store.save_placement(model, plan_to_json(resolved, plan, [], self.planner.coordinator_protocol))
        self.runtime.events("placement", model, f"on {len(backends)} backend(s): --rpc {','.join(endpoints)} "
                            f"--tensor-split {','.join(map(str, plan.tensor_split))}",
                            backends=list(endpoints), tensor_split=plan.tensor_split,
                            layers=[assignment_doc(a) for a in plan.assignments])
        e = plan.estimate
        return CoordinatorSpec(model, resolved.path, backends, tuple(plan.tensor_split), e.n_layers,
                               e.ctx_per_slot, e.parallel)

    def release(self, model: str) -> None:
        if self._plans.pop(model, None) is not None:
            self.store.remove_placement(model)

    def backends_changed(self, spec: CoordinatorSpec) -> str | None:
        for backend in spec.backends:
            record = self.inventory.record(backend.node)
            if record is None:
                return f"node {backend.node} was removed"
            if record.status is None:
                continue  # not heard from since a controller restart: the process will tell
            rpc = record.status.rpc_server
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
                "nodes": [b.node for b in d.spec.backends] if d.spec else [],
                "tensor_split": list(d.spec.tensor_split) if d.spec else [],
                "assignments": [assignment_doc(a) for a in plan.assignments] if plan else [],
                "ctx": d.spec.ctx_per_slot if d.spec else None,
                "parallel": d.spec.parallel if d.spec else None,
                "size_bytes": sum(a.total_bytes for a in plan.assignments) if plan else 0,
                "gpu_bytes": sum(a.total_bytes for a in plan.assignments if a.device != "CPU") if plan else 0,
                "pid": d.process.proc.pid if d.process else None,
                "url": d.process.url if d.process else None,  # loopback only: for debugging and benchmarks
                "state_since_unix_ms": int(d.state_since * 1000),
                "restarts": d.restarts,
                "last_exit": d.last_exit,
                "last_output": list(d.last_output),
                "load_duration_s": round(d.load_duration_s, 3),
                "in_flight": d.active,
                "expires_at_unix": expires,
                "log": str(d.process.log_path) if d.process else None,
            })
        return out

