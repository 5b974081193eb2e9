"""`plan MODEL`: resolve the name, read the header, estimate, and place over the live inventory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.patches import PRECOMPUTED_HASHES_PATCH
from llamafleet.common.units import format_size
from llamafleet.controller.estimate import MemoryEstimate, estimate_memory
from llamafleet.controller.gguf import GGUFHeader, read_gguf_header
from llamafleet.controller.holders import Holders, ModelDigests, find_holders
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.models import ModelStore, ResolvedModel
from llamafleet.controller.placement.coordinator import choose_coordinator
from llamafleet.controller.placement.nodes import NodeView
from llamafleet.controller.placement.plan import Headroom, Plan, make_plan, with_coordinator_share
from llamafleet.controller.tensor_hashes import TensorHashes

MAX_CTX = 1 << 24
# With auto slots, at most this many: past 8 streams a GPU's aggregate decode barely grows
# (680 vs 598 tok/s at 8 vs 4 on an H200) while every slot costs a context's KV cache.
DEFAULT_MAX_PARALLEL = 8
# Every model in use, however many alternate (a header without its arrays is small).
HEADERS_KEPT = 512
# How often the known models' files are looked at again for headers to read ahead.
HEADER_SCAN_S = 10.0
log = logging.getLogger(__name__)


class Planner:
    def __init__(self, models: ModelStore, inventory: Inventory, coordinator: Manifest | None,
                 headroom: Headroom, parallel: int, default_ctx: int, max_parallel: int = DEFAULT_MAX_PARALLEL,
                 digests: ModelDigests | None = None) -> None:
        """`parallel`: request slots per coordinator; 0 is auto (as many as fit, up to `max_parallel`).
        `digests`: the controller's model hashes, to find the nodes that hold a model (None: nobody does)."""
        self.digests = digests
        self.tensor_hashes: TensorHashes | None = None  # set by the daemon
        # --coordinator: auto, worker, controller or a node's address (controller/placement/coordinator.py).
        # "controller" until the daemon says otherwise: a planner without agents that run coordinators.
        self.coordinator_mode = "controller"
        self.models = models
        self.inventory = inventory
        self.coordinator = coordinator
        self.headroom = headroom
        self.parallel = parallel
        self.max_parallel = max_parallel
        self.default_ctx = default_ctx
        self._headers: dict[tuple[Path, int, int], GGUFHeader] = {}

    @property
    def coordinator_protocol(self) -> str | None:
        """The RPC protocol of the llama.cpp the coordinator runs (None until there is a build)."""
        return self.coordinator.rpc_protocol_version if self.coordinator else None

    @property
    def coordinator_reads_hashes(self) -> bool:
        """Whether the coordinator's llama-server has patches/llama.cpp/0002 (a stock one ignores the file)."""
        return self.coordinator is not None and PRECOMPUTED_HASHES_PATCH in self.coordinator.patch_names

    def slot_counts(self) -> list[int]:
        """The slot counts a plan may use, most first."""
        return [self.parallel] if self.parallel else list(range(self.max_parallel, 0, -1))

    def header(self, path: Path) -> GGUFHeader:
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        header = self._headers.pop(key, None) or read_gguf_header(path)
        self._remember(key, header)
        return header

    async def read_header(self, model: str) -> None:
        """Have `model`'s header in the cache, read in a thread: the async paths call this first,
        so that `plan()` on the event loop finds it there rather than reading the file."""
        await self._read_into_cache(self.models.resolve(model).path)

    async def keep_headers_read(self) -> None:
        """Run forever (supervised): every known model's header in the cache, read in a thread.

        A header read walks a vocabulary of up to 262k strings (~0.1 s); the gateway routes a
        request synchronously, so the first request for a model would otherwise pay for it on
        the event loop. A model that appears (a pull, a new file) is read within a scan."""
        while True:
            for model in await asyncio.to_thread(self.models.list):
                try:
                    await self._read_into_cache(model.path)
                except (LlamafleetError, OSError) as exc:
                    # Not a usable GGUF (or gone meanwhile): its requests get the error when they plan.
                    log.debug("not caching the header of %s: %s", model.path, exc)
            await asyncio.sleep(HEADER_SCAN_S)

    async def _read_into_cache(self, path: Path) -> None:
        stat = await asyncio.to_thread(path.stat)
        key = (path, stat.st_mtime_ns, stat.st_size)
        if key not in self._headers:
            self._remember(key, await asyncio.to_thread(read_gguf_header, path))

    def _remember(self, key: tuple[Path, int, int], header: GGUFHeader) -> None:
        self._headers.pop(key, None)
        self._headers[key] = header  # most recently used last
        while len(self._headers) > HEADERS_KEPT:
            # Several models alternate on one fleet: keep theirs, not just the last one's.
            del self._headers[next(iter(self._headers))]

    def plan(self, model: str, ctx: int | None = None, reserved: Mapping[tuple[str, str], int] | None = None,
             load: dict[str, int] | None = None,
             busy: Mapping[str, str] | None = None) -> tuple[ResolvedModel, Plan, list[str]]:
        """Place `model` over the ready nodes, minus `reserved` bytes per (node, device) already promised
        and the rpc-servers `busy` with other models; with auto slots, the most slots that fit."""
        resolved, header, _ = self._estimate(model, ctx, 1)
        warnings = []
        protocol = self.coordinator_protocol
        if protocol is None:
            warnings.append("the controller has no llama.cpp build (run `llamafleet build` or pass --llama-cpp): "
                            "RPC protocol versions were not compared")
        views = [v.reserving(reserved or {}) for v in self.inventory.node_views(load)]
        holders = (find_holders(resolved.path, views, self.digests) if self.digests is not None
                   else Holders.none(""))
        if self.tensor_hashes is not None and (holders.addresses or self.coordinator_reads_hashes):
            # Holders' pre-staging and a patched coordinator want the tensor hashes: start now, even
            # before the digests that name the holders are known, so that the first load need not wait.
            self.tensor_hashes.prefetch(resolved.path, header)

        def place(slots: int, max_nodes: int | None = None) -> Plan:
            made = make_plan(model, estimate_memory(header, ctx or self.default_ctx, slots), views, protocol,
                             self.headroom, lambda c: estimate_memory(header, c, slots), busy, max_nodes,
                             holders.addresses)
            reason = "; ".join(part for part in (holders.note, made.holder_reason) if part)
            return replace(made, holder_reason=reason)

        counts = self.slot_counts()
        fewest = place(counts[-1])
        if len(counts) == 1 or not fewest.fits:
            return resolved, self._with_coordinator(fewest, views), warnings
        # Auto: the most slots that fit on as many nodes as one slot needs (a slot is worth less
        # than a network hop per token). More slots never fit where fewer do not: bisect.
        nodes = len({a.node for a in fewest.assignments})
        low, high, best = 0, len(counts) - 2, fewest
        while low <= high:
            mid = (low + high) // 2
            attempt = place(counts[mid], nodes)
            if attempt.fits:
                best, high = attempt, mid - 1
            else:
                low = mid + 1
        return resolved, self._with_coordinator(best, views), warnings

    def cannot_host(self, host_bytes: int = 0) -> dict[str, str]:
        """Node → why its agent cannot run a coordinator ("" when it can); `host_bytes`: what the
        coordinator keeps in its host's RAM (the token embeddings and the other tensors outside the
        layers: the estimate's host parts, mapped from the file)."""
        out = {}
        for record in self.inventory.records():
            status = record.status
            if status is None:
                out[record.address] = "has not reported yet"
            elif not status.coordinator_proxy:
                out[record.address] = "runs no coordinators (--max-coordinators 0, or an agent older than that)"
            elif not status.build.install_dir:
                out[record.address] = "has no llama.cpp build"
            elif status.host.available_bytes and status.host.available_bytes < host_bytes:
                out[record.address] = (f"has {format_size(status.host.available_bytes)} of host memory available, "
                                       f"and the coordinator keeps {format_size(host_bytes)} there")
            else:
                out[record.address] = ""
        return out

    def _with_coordinator(self, plan: Plan, views: list[NodeView]) -> Plan:
        """The plan with where its coordinator runs (controller/placement/coordinator.py); the chosen
        node's share moved to where it computes it best (with_coordinator_share)."""
        asks = self.coordinator_mode != "controller" and plan.fits and plan.holders
        host = plan.estimate.token_embd_bytes + plan.estimate.host_other_bytes if asks else 0
        choice = choose_coordinator(plan, self.coordinator_mode, self.cannot_host(host) if asks else {})
        if choice.refused:
            return replace(plan, fits=False, reason=choice.reason, coordinator_reason=choice.reason)
        if not choice.node:
            return replace(plan, coordinator="", coordinator_reason=choice.reason)
        reordered = with_coordinator_share(plan, views, self.headroom, choice.node)
        if reordered is None:
            why = (f"on the controller: the model would not fit with {choice.node}'s share where its own coordinator "
                   "needs it (first for a CPU, last for GPUs)")
            if self.coordinator_mode not in ("auto", "controller"):
                return replace(plan, fits=False, reason=why, coordinator_reason=why)
            return replace(plan, coordinator="", coordinator_reason=why)
        placed = replace(reordered, coordinator=choice.node)
        last = "; its GPUs take the last layers and the output layer, so the logits never cross the network"
        return replace(placed, coordinator_reason=choice.reason + (last if placed.local_last else ""))

    def estimate(self, model: str, ctx: int | None = None) -> tuple[ResolvedModel, MemoryEstimate]:
        """The estimate with the fewest slots this controller would use (1 with auto)."""
        resolved, _, estimate = self._estimate(model, ctx, self.slot_counts()[-1])
        return resolved, estimate

    def _estimate(self, model: str, ctx: int | None, slots: int) -> tuple[ResolvedModel, GGUFHeader, MemoryEstimate]:
        ctx = self.default_ctx if ctx is None else ctx
        if not 1 <= ctx <= MAX_CTX:
            raise UsageError(f"ctx must be between 1 and {MAX_CTX}, not {ctx}")
        resolved = self.models.resolve(model)
        header = self.header(resolved.path)
        return resolved, header, estimate_memory(header, ctx, slots)


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
            "kv_bytes_per_slot": sum(e.kv_bytes_per_layer) // e.parallel,
            "cache_type": e.cache_type, "output_tied": e.output_tied, "parts": e.parts(),
            "device_total_bytes": e.device_total,
        },
        "backends": plan.backends,
        "tensor_split": plan.tensor_split,
        "assignments": [asdict(a) | {"total_bytes": a.total_bytes} for a in plan.assignments],
        "excluded": plan.excluded,
        "holders": plan.holders,
        "holder_reason": plan.holder_reason,
        "coordinator": plan.coordinator or "controller",
        "coordinator_reason": plan.coordinator_reason,
        "coordinator_rpc_protocol": coordinator_protocol,
        "warnings": warnings,
    }
