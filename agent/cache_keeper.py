"""The agent's cache keeper: a background loop that keeps the rpc tensor cache honest and bounded.

Every `interval_s` (and soon after each staging, which kicks it) one pass: enforce the cap
(agent/rpc_cache.py: least recently used models first, never one a running coordinator uses,
then entries from the network, oldest first), then verify the entries not verified yet (new
ones, and what rpc-servers wrote from the network) and remove those whose content does not hash
to their name. Everything it removes is logged with why; the summary is the status's
`rpc_cache`.

Supervised: a pass that fails is logged (with its traceback, once per cause) and reported in the summary's
`error`, and the loop waits before the next pass (never a hot loop, never a silent end). The
disk work runs in threads; `stop()` makes a verification give up between chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Callable

from llamafleet.common.fnv import Fnv1a, FnvUnavailable
from llamafleet.agent.rpc_cache import (
    CacheSummary,
    CacheWorkStopped,
    GcReport,
    RpcCache,
    SlotAlive,
    SlotUse,
    effective_cap,
)
from llamafleet.common.units import format_size
from llamafleet.common.supervised import describe_exception

log = logging.getLogger(__name__)
# After a failed pass the next waits this long (or the interval, if shorter, but never under
# RETRY_MIN_S): a kick does not shorten it, so a pass that keeps failing is no hot loop.
RETRY_S = 30.0
RETRY_MIN_S = 1.0
# A kick waits this long for more (a placement stages several models in a row): one pass for all.
KICK_SETTLE_S = 1.0


def running_slots_alive(running: dict[int, tuple[int, int]]) -> SlotAlive:
    """In the daemon a slot's model is in use while the rpc-server of that slot runs the
    generation (and process) it ran when the model was staged for it."""

    def alive(index: int, use: SlotUse) -> bool:
        return running.get(index) == (use.generation, use.pid)

    return alive


def _log_evictions(report: GcReport, cap: int) -> None:
    for why in dict.fromkeys(r.why for r in report.removed):
        mine = [r.entry for r in report.removed if r.why == why]
        log.info("rpc cache over its cap of %s: evicted %d entr%s (%s): %s", format_size(cap), len(mine),
                 "y" if len(mine) == 1 else "ies", format_size(sum(e.size for e in mine)), why)
    if report.over_cap_bytes:
        log.warning("rpc cache is still %s over its cap of %s: the rest is in use by running coordinators "
                    "or being written", format_size(report.over_cap_bytes), format_size(cap))


class CacheKeeper:
    def __init__(self, cache: RpcCache, fnv: Fnv1a, cap_setting: int | None, interval_s: float,
                 running_slots: Callable[[], dict[int, tuple[int, int]]],
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.cache = cache
        self._fnv = fnv
        self._cap_setting = cap_setting
        self.interval_s = interval_s
        self._running_slots = running_slots  # slot → (generation, pid) of each running rpc-server
        self._on_change = on_change
        self._kick = asyncio.Event()
        self._stop = threading.Event()
        self._summary = CacheSummary(cache_dir=str(cache.cache_dir))
        self.passes = 0

    @property
    def summary(self) -> CacheSummary:
        return self._summary

    def kick(self) -> None:
        """Run a pass soon (after a staging: a new model, maybe over the cap)."""
        self._kick.set()

    def stop(self) -> None:
        self._stop.set()

    def _publish(self, summary: CacheSummary) -> None:
        if summary != self._summary:
            self._summary = summary
            self._on_change()

    async def check(self) -> None:
        """One pass: the cap, then verification; the summary after each."""
        cap = await asyncio.to_thread(effective_cap, self._cap_setting, self.cache.cache_dir)
        alive = running_slots_alive(self._running_slots())
        report = await asyncio.to_thread(self.cache.enforce, cap, alive)
        _log_evictions(report, cap)
        self._publish(dataclasses.replace(report.summary, error=self._summary.error))
        error = ""
        try:
            corrupt = await asyncio.to_thread(self.cache.verify, self._fnv, self._stop)
        except FnvUnavailable as exc:
            # The cap still holds without a compiler; only the checks wait for one.
            error = f"cannot verify entries: {exc.message}"
            log.warning("rpc cache keeper: %s", error)
        else:
            for removal in corrupt:
                log.warning("removed rpc cache entry %s (%s), %s: a staging writes it again, else the next load "
                            "sends its bytes", removal.entry.name, format_size(removal.entry.size), removal.why)
        alive = running_slots_alive(self._running_slots())
        summary = await asyncio.to_thread(self.cache.summarize, cap, alive)
        self._publish(dataclasses.replace(summary, error=error))
        self.passes += 1

    @property
    def _retry_s(self) -> float:
        return max(RETRY_MIN_S, min(RETRY_S, self.interval_s))

    async def run(self) -> None:
        """Until cancelled (or stopped): a pass, then wait for a kick or the interval."""
        last_cause = ""
        while not self._stop.is_set():
            failed = False
            try:
                await self.check()
                last_cause = ""
            except CacheWorkStopped:
                return
            except Exception as exc:  # noqa: BLE001 - the keeper outlives its own failures: logged, reported, retried
                failed = True
                cause = describe_exception(exc)
                if cause != last_cause:
                    log.exception("rpc cache keeper pass failed; next try in %.0f s", self._retry_s)
                else:
                    # The same cause again: its traceback is in the log already.
                    log.error("rpc cache keeper pass failed again: %s; next try in %.0f s", cause, self._retry_s)
                last_cause = cause
                self._publish(dataclasses.replace(self._summary, error=f"keeper pass failed: {exc!r}"[:500]))
            if failed:
                await asyncio.sleep(self._retry_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.interval_s)
            if self._kick.is_set():
                await asyncio.sleep(KICK_SETTLE_S)
            self._kick.clear()
