"""`plan MODEL`: resolve the name, read the header, estimate, and place over the live inventory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llamafleet.common.errors import UsageError
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.controller.estimate import MemoryEstimate, estimate_memory
from llamafleet.controller.gguf import GGUFHeader, read_gguf_header
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.models import ModelStore, ResolvedModel
from llamafleet.controller.placement.plan import Headroom, Plan, make_plan

MAX_CTX = 1 << 24


class Planner:
    def __init__(self, models: ModelStore, inventory: Inventory, coordinator: Manifest | None,
                 headroom: Headroom, parallel: int, default_ctx: int) -> None:
        self.models = models
        self.inventory = inventory
        self.coordinator = coordinator
        self.headroom = headroom
        self.parallel = parallel
        self.default_ctx = default_ctx
        self._headers: dict[tuple[Path, int, int], GGUFHeader] = {}

    @property
    def coordinator_protocol(self) -> str | None:
        """The RPC protocol of the llama.cpp the coordinator runs (None until there is a build)."""
        return self.coordinator.rpc_protocol_version if self.coordinator else None

    def header(self, path: Path) -> GGUFHeader:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._headers:
            self._headers = {key: read_gguf_header(path)}  # one model at a time is plenty
        return self._headers[key]

    def plan(self, model: str, ctx: int | None = None, reserved: Mapping[tuple[str, str], int] | None = None,
             load: dict[str, int] | None = None) -> tuple[ResolvedModel, Plan, list[str]]:
        """Place `model` over the ready nodes, minus `reserved` bytes per (node, device) already promised."""
        resolved, header, estimate = self._estimate(model, ctx)
        warnings = []
        protocol = self.coordinator_protocol
        if protocol is None:
            warnings.append("the controller has no llama.cpp build (run `llamafleet build` or pass --llama-cpp): "
                            "RPC protocol versions were not compared")
        views = [v.reserving(reserved or {}) for v in self.inventory.node_views(load)]
        plan = make_plan(model, estimate, views, protocol,
                         self.headroom, lambda c: estimate_memory(header, c, self.parallel))
        return resolved, plan, warnings

    def estimate(self, model: str, ctx: int | None = None) -> tuple[ResolvedModel, MemoryEstimate]:
        resolved, _, estimate = self._estimate(model, ctx)
        return resolved, estimate

    def _estimate(self, model: str, ctx: int | None) -> tuple[ResolvedModel, GGUFHeader, MemoryEstimate]:
        ctx = self.default_ctx if ctx is None else ctx
        if not 1 <= ctx <= MAX_CTX:
            raise UsageError(f"ctx must be between 1 and {MAX_CTX}, not {ctx}")
        resolved = self.models.resolve(model)
        header = self.header(resolved.path)
        return resolved, header, estimate_memory(header, ctx, self.parallel)


def plan_to_json(resolved: ResolvedModel, plan: Plan, warnings: list[str], coordinator_protocol: str | None) -> dict[str, Any]:
    e = plan.estimate
    return {
        "model": plan.model,
        "path": str(resolved.path),
        "source": resolved.source,
        "fits": plan.fits,
        "reason": plan.reason,
        "estimate": {
            "architecture": e.architecture, "n_layers": e.n_layers, "ctx": e.ctx_per_slot, "parallel": e.parallel,
            "cache_type": e.cache_type, "output_tied": e.output_tied, "parts": e.parts(),
            "device_total_bytes": e.device_total,
        },
        "backends": plan.backends,
        "tensor_split": plan.tensor_split,
        "assignments": [asdict(a) | {"total_bytes": a.total_bytes} for a in plan.assignments],
        "excluded": plan.excluded,
        "coordinator_rpc_protocol": coordinator_protocol,
        "warnings": warnings,
    }
