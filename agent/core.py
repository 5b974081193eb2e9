"""The agent's domain: the rpc-server supervisors, the device providers, the build, and change notifications.

The gRPC service and the systemd integration sit on top of `Agent`; neither holds state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamafleet.agent.cache_keeper import CacheKeeper
from llamafleet.agent.coordinators import CoordinatorSnapshot, Coordinators
from llamafleet.common.fnv import Fnv1a
from llamafleet.agent.devices import DeviceInfo, DeviceProvider, HostMemoryInfo, HostProvider, NvmlProvider
from llamafleet.agent.gpus import GpuIdentityError, RpcGroup, check_banner, rpc_groups, visible_gpus
from llamafleet.agent.models import ModelFile, ModelIndex
from llamafleet.agent.node import NodeIdentity
from llamafleet.agent.pull import Offer, Prepared, Push, PushRefused, Received, Receiver
from llamafleet.agent.rpc_cache import CacheSummary, RpcCache, SlotUse, process_started_ms
from llamafleet.agent.settings import AgentSettings
from llamafleet.agent.staging import ByteRange, StageResult, StagingRefused, check_request, find_model, stage
from llamafleet.agent.supervisor import RpcLaunch, RpcServerSnapshot, RpcServerSupervisor, RpcState
from llamafleet.common.changes import ChangeFeed
from llamafleet.common.digests import FileKey
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.llamacpp.build import BuildEvent, BuildOptions, BuildOutcome, current_manifest, run_build
from llamafleet.common.llamacpp.install import InstallError, Manifest, adopt_install
from llamafleet.common.llamacpp.patches import REFERENCE_ENTRIES_PATCH
from llamafleet.common.process import line_buffered
from llamafleet.common.restart import RestartPolicy
from llamafleet.common.units import format_size

log = logging.getLogger(__name__)
# Remembered FNV-1a values of staged ranges; past this many the memo starts again (it only saves reads).
STAGE_HASHES_KEPT = 100_000


class BuildBusyError(LlamafleetError):
    """A build is already running on this worker."""


@dataclass(frozen=True)
class AgentSnapshot:
    """Everything the agent reports, at one moment (converted to the wire in convert.py)."""

    node: NodeIdentity
    build: Manifest | None
    rpc_servers: tuple[RpcServerSnapshot, ...]  # by index; the first is the node's `rpc_server`
    devices: list[DeviceInfo]
    host: HostMemoryInfo
    memory_limit_bytes: int
    observed_at_unix_ms: int
    rpc_layout: str = "shared"
    models: tuple[ModelFile, ...] = ()
    models_omitted: int = 0
    models_dir: str = ""
    rpc_cache: CacheSummary | None = None  # None with --no-rpc-cache
    coordinators: tuple[CoordinatorSnapshot, ...] = ()
    coordinator_proxy: str = ""  # HOST:PORT of the coordinator proxy ("" when it runs none)

    @property
    def rpc_server(self) -> RpcServerSnapshot:
        return self.rpc_servers[0]


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        node: NodeIdentity,
        gpu_provider: DeviceProvider | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.changes = ChangeFeed()
        self._gpus = gpu_provider or NvmlProvider()
        self._host = HostProvider()
        self._build: Manifest | None = None
        self._build_error = ""
        self._build_lock = asyncio.Lock()
        policy = RestartPolicy(
            initial_s=settings.restart_backoff_initial_s, max_s=settings.restart_backoff_max_s,
            max_failures=settings.restart_max_failures, healthy_reset_s=settings.healthy_reset_s,
        )
        # Which GPUs each rpc-server process of a slot serves (agent/gpus.py), fixed for the
        # agent's life: GPUs do not come and go under a running agent. When they cannot be told
        # apart, every start fails with the reason (the node's error) instead of guessing.
        self._groups, self._groups_error = self._plan_groups()
        per_slot = len(self._groups)
        # One slot per model: an rpc-server serves one coordinator at a time, so a second model
        # on this worker needs a second set of processes. A slot is one process (shared layout)
        # or one per GPU (per-device); process #i listens on rpc_port + i. Slot 0 starts with the
        # agent; the others when the controller asks (and it stops them when their model unloads).
        self.supervisors = tuple(
            RpcServerSupervisor(
                functools.partial(self._launch, index), policy, on_change=self.changes.bump,
                autostart=settings.rpc_autostart and index < per_slot, index=index,
                endpoint=settings.rpc_endpoint_of(index), slot=index // per_slot,
            )
            for index in range(settings.max_rpc_servers * per_slot)
        )
        # The model store: None without --models-dir (the daemon runs its rescan loop).
        self.models = (ModelIndex(settings.models_dir, settings.state_path, settings.models_rescan_s,
                                  on_change=self.changes.bump) if settings.models_dir else None)
        # Pulls write into the models dir: without one there is nowhere to keep a file.
        self.receiver = Receiver(self.models) if self.models is not None else None
        self._fnv = Fnv1a(settings.state_path / "fnv1a")
        # One staging at a time: they compete for the same disk, and a queue is fairer than a refusal.
        self._staging = asyncio.Lock()
        self._stage_hashes: dict[tuple[FileKey, int, int], int] = {}
        self._stop_staging = threading.Event()
        self._stagings: set[threading.Event] = set()  # the stop of every staging under way
        self.rpc_cache = RpcCache(settings.cache_path / "rpc", settings.state_path)
        # The daemon runs it (None with --no-rpc-cache: the rpc-servers then write no entries).
        self.cache_keeper = (CacheKeeper(self.rpc_cache, self._fnv, settings.rpc_cache_max, settings.rpc_cache_check_s,
                                         self._running_slots, on_change=self.changes.bump)
                             if settings.rpc_cache else None)
        # Model coordinators next to the weights (agent/coordinators.py); the daemon makes it, since
        # their keys come from the node credential.
        self.coordinators: Coordinators | None = None

    def llama_server(self) -> Path | None:
        """The llama-server of the active build (None without one)."""
        return Path(self._build.llama_server) if self._build is not None else None

    def gpu_uuids(self) -> list[str]:
        return [d.uuid for d in self._gpus.devices() if d.uuid]

    @property
    def supervisor(self) -> RpcServerSupervisor:
        """The first rpc-server's: the one that starts with the agent."""
        return self.supervisors[0]

    def supervisor_at(self, index: int) -> RpcServerSupervisor:
        if not 0 <= index < len(self.supervisors):
            raise UsageError(f"no rpc-server #{index}: this agent runs at most {len(self.supervisors)} "
                             f"(--max-rpc-servers {self.settings.max_rpc_servers} × {len(self._groups)} per slot)")
        return self.supervisors[index]

    # ---- the llama.cpp install ---------------------------------------------------------------

    def load_build(self) -> None:
        """Find the install to run: the adopted one, else the state dir's `current`."""
        try:
            if self.settings.llama_cpp is not None:
                self._build = adopt_install(self.settings.llama_cpp)
            else:
                self._build = current_manifest(self.settings.state_path)
            self._build_error = "" if self._build else (
                f"no llama.cpp build in {self.settings.state_path}: run `llamafleet-agent build` "
                "or pass --llama-cpp DIR"
            )
        except LlamafleetError as exc:
            # A broken install is reported in status (and the rpc-server stays down), not fatal.
            self._build, self._build_error = None, exc.message
        if self._build_error:
            log.warning("%s", self._build_error)

    def _plan_groups(self) -> tuple[list[RpcGroup], str]:
        s = self.settings
        try:
            visible = visible_gpus(self._gpus.devices(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                                   os.environ.get("CUDA_DEVICE_ORDER"))
            groups = rpc_groups(s.rpc_layout, visible, s.devices)
        except GpuIdentityError as exc:
            log.error("%s", exc.message)
            return [RpcGroup(tuple(s.devices), ())], exc.message
        if s.rpc_port + s.max_rpc_servers * len(groups) - 1 > 65535:
            return groups, (f"rpc_port {s.rpc_port} + {s.max_rpc_servers} slots × {len(groups)} rpc-servers "
                            "runs past port 65535")
        for position, group in enumerate(groups):
            log.info("rpc layout %s: rpc-server %d of each slot serves %s", s.rpc_layout, position,
                     ", ".join(f"{g.name} {g.uuid} (bus {g.pci_bus_id or '?'})" for g in group.gpus)
                     or ",".join(group.device_args) or "its default devices")
        return groups, ""

    def _launch(self, index: int) -> RpcLaunch:
        if self._groups_error:
            raise GpuIdentityError(self._groups_error)
        if self._build is None:
            raise InstallError(self._build_error or "no llama.cpp install")
        s = self.settings
        group = self._groups[index % len(self._groups)]
        port = s.rpc_port + index
        argv = [self._build.rpc_server, "-H", s.rpc_host, "-p", str(port)]
        if s.rpc_threads:
            argv += ["-t", str(s.rpc_threads)]
        if group.device_args:
            argv += ["-d", ",".join(group.device_args)]
        env = dict(os.environ) | dict(group.env)
        cache_dir = ""
        if s.rpc_cache:
            argv.append("-c")
            # rpc-server keeps its cache in $LLAMA_CACHE/rpc; all of this node's share it (the
            # same tensor is the same file, whichever process serves the model).
            env["LLAMA_CACHE"] = str(s.cache_path)
            cache_dir = str(s.cache_path / "rpc")
        return RpcLaunch(line_buffered(argv), env, port, s.rpc_endpoint_of(index), cache_dir,
                         verify=functools.partial(check_banner, expected=group.gpus),
                         gpu_ids=tuple((g.uuid, g.pci_bus_id) for g in group.gpus))

    async def run_build(self, options: BuildOptions, progress: Callable[[BuildEvent], None]) -> BuildOutcome:
        if self._build_lock.locked():
            raise BuildBusyError("a build is already running on this worker")
        async with self._build_lock:
            outcome = await asyncio.to_thread(run_build, options, progress)
        if self.settings.llama_cpp is None:
            self.load_build()
            self.changes.bump()
            for supervisor in self.supervisors[:len(self._groups)]:  # slot 0's, which start with the agent
                if supervisor.snapshot().state == RpcState.FAILED and self.settings.rpc_autostart:
                    # The rpc-server was down for want of binaries: now there are some.
                    supervisor.request("start")
        return outcome

    # ---- pre-staging ---------------------------------------------------------------------------

    def _running_slots(self) -> dict[int, tuple[int, int]]:
        """(generation, pid) of every running rpc-server, by slot: whose staged models are in use."""
        return {s.index: (s.generation, s.pid) for s in (sup.snapshot() for sup in self.supervisors)
                if s.state == RpcState.RUNNING}

    def _stage_and_record(self, model: ModelFile, ranges: list[ByteRange], stop: threading.Event,
                          serving: Mapping[int, tuple[int, int] | None]) -> StageResult:
        """Stage under the cache's lock (nothing is evicted meanwhile) and record what the model
        uses; `serving`: rpc-server index → (generation, pid) of it when it runs (blocking)."""
        with self.rpc_cache.transaction() as state:
            result = stage(model, ranges, self.rpc_cache.cache_dir, self._fnv, stop, hashes=self._stage_hashes,
                           verified=state.verified, references=self.reads_reference_entries)
            uses: dict[int, SlotUse | None] = {}
            for index, process in serving.items():
                uses[index] = None
                if process is not None and (started := process_started_ms(process[1])) is not None:
                    uses[index] = SlotUse(model.sha256, process[0], process[1], started)
            state.record_stage(model.sha256, model.name, dict(zip(result.entries, result.sizes, strict=True)),
                               int(time.time() * 1000), uses)
            state.corrupt_removed += result.rewritten
        return result

    async def stage_tensors(self, sha256: str, ranges: list[ByteRange],
                            rpc_server_indexes: Sequence[int] = ()) -> StageResult:
        """Write the rpc tensor cache entries for `ranges` of the model file with `sha256` (see staging.py).

        `rpc_server_indexes`: the rpc-servers whose coordinator will use them (one per GPU of the
        share with the per-device layout); the keeper never evicts them while one of those runs
        the generation it runs now and no other model was staged for it since (rpc_cache.py)."""
        check_request(sha256, ranges)
        indexes = sorted(set(rpc_server_indexes))
        for index in indexes:
            self.supervisor_at(index)  # INVALID_ARGUMENT beyond --max-rpc-servers
        if not self.settings.rpc_cache:
            raise StagingRefused("this agent runs its rpc-servers without the tensor cache (--no-rpc-cache): "
                                 "there is nothing to stage into")
        if self.models is None:
            raise StagingRefused("this agent has no models dir (--models-dir): it holds no model files")
        model = find_model(self.models.files, sha256)
        async with self._staging:
            if len(self._stage_hashes) > STAGE_HASHES_KEPT:
                self._stage_hashes.clear()
            # This call's own stop: a cancelled call (the controller gave up) stops its thread,
            # and the lock is held until the thread has ended, so stagings never overlap.
            stop = threading.Event()
            if self._stop_staging.is_set():
                stop.set()
            self._stagings.add(stop)
            serving: dict[int, tuple[int, int] | None] = {}
            for index in indexes:
                snap = self.supervisors[index].snapshot()
                serving[index] = (snap.generation, snap.pid) if snap.state == RpcState.RUNNING else None
            work = asyncio.ensure_future(asyncio.to_thread(self._stage_and_record, model, ranges, stop, serving))
            try:
                result = await asyncio.shield(work)
            except asyncio.CancelledError:
                stop.set()
                with contextlib.suppress(Exception):
                    # Its outcome no longer matters (StagingStopped, most likely); its end does.
                    await work
                raise
            finally:
                self._stagings.discard(stop)
                if self.cache_keeper is not None:
                    self.cache_keeper.kick()  # the cap, now that this model's entries are there
        log.info("staged %s: %d entries written (%d as references, %d rewritten), %d present, %d below the "
                 "threshold, %s in %.2fs", model.name, result.staged, result.referenced, result.rewritten,
                 result.present, result.skipped_small, format_size(result.bytes_written), result.seconds)
        return result

    @property
    def reads_reference_entries(self) -> bool:
        """Whether this agent's rpc-server reads `<hash>.ref` entries (patches/llama.cpp/0003)."""
        return self._build is not None and REFERENCE_ENTRIES_PATCH in self._build.patch_names

    def stop_threads(self) -> None:
        """Tell staging and pull threads to give up between chunks (the agent is stopping)."""
        self._stop_staging.set()
        for stop in self._stagings:
            stop.set()
        if self.cache_keeper is not None:
            self.cache_keeper.stop()
        if self.receiver is not None:
            self.receiver.stop()

    # ---- pulls (agent/pull.py) -----------------------------------------------------------------

    async def prepare_push(self, offer: Offer) -> Prepared:
        """Whether `offer` is held already, and where a push of it resumes."""
        offer.check()
        return await self._receiver().prepare(offer)

    async def begin_push(self, offer: Offer, offset: int) -> Push | Received:
        """Open a push of `offer` at `offset` (a Push to fill), or say the file is held already."""
        offer.check()
        return await self._receiver().begin(offer, offset)

    def _receiver(self) -> Receiver:
        if self.receiver is None:
            raise PushRefused("this agent has no models dir (--models-dir): it has nowhere to keep model files")
        return self.receiver

    # ---- status ------------------------------------------------------------------------------

    def snapshot(self) -> AgentSnapshot:
        limit = self.settings.memory_limit
        devices = [d.capped(limit) for d in self._gpus.devices() + self._host.devices()]
        return AgentSnapshot(
            node=self.node,
            build=self._build,
            rpc_servers=tuple(supervisor.snapshot() for supervisor in self.supervisors),
            devices=devices,
            host=self._host.memory(),
            memory_limit_bytes=limit,
            observed_at_unix_ms=int(time.time() * 1000),
            rpc_layout=self.settings.rpc_layout,
            models=self.models.files if self.models else (),
            models_omitted=self.models.omitted if self.models else 0,
            models_dir=str(self.models.root) if self.models else "",
            rpc_cache=self.cache_keeper.summary if self.cache_keeper else None,
            coordinators=self.coordinators.snapshots() if self.coordinators else (),
            coordinator_proxy=self.coordinators.proxy_endpoint if self.coordinators else "",
        )

    def status_line(self) -> str:
        """One line for systemd's STATUS=: rpc-server state, endpoint, free memory."""
        snap = self.snapshot()
        rpc = snap.rpc_server
        line = f"rpc-server {rpc.state.value}"
        if rpc.state == RpcState.RUNNING:
            line += f" at {rpc.endpoint} (pid {rpc.pid}, generation {rpc.generation})"
        elif rpc.last_exit:
            line += f": {rpc.last_exit}"
        others = sum(1 for r in snap.rpc_servers[1:] if r.state == RpcState.RUNNING)
        if others:
            line += f" (+{others} more rpc-server{'s' if others > 1 else ''} running)"
        free = ", ".join(f"{d.name} {format_size(d.free_bytes)}" for d in snap.devices)
        return f"{line}; free {free}"
