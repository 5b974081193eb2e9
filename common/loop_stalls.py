"""How long the event loop went without running anything else: the longest stall, measured.

Blocking calls on the loop (a subprocess probe, a header read, a slow disk) hold every request,
heartbeat and stream. A coroutine sleeps a short period and counts how late it woke; a thread
beside it notes where the loop's thread is when a stall passes WARN_S, so the log names the
culprit rather than only the symptom.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

log = logging.getLogger(__name__)
PERIOD_S = 0.01
# A stall this long is logged, with the loop thread's stack as the watching thread saw it.
WARN_S = 0.25


class LoopStalls:
    def __init__(self, warn_s: float = WARN_S) -> None:
        self.longest_s = 0.0
        self.over_50ms = 0  # stalls longer than 50 ms since the start
        self._warn_s = warn_s
        self._tick = time.monotonic()
        self._where = ""

    async def watch(self) -> None:
        """Run forever (under a Supervised); cancelling ends it."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        spotter = threading.Thread(target=self._spot, args=(threading.get_ident(), stop),
                                   name="event loop stall spotter", daemon=True)
        spotter.start()
        try:
            while True:
                before = loop.time()
                self._tick = time.monotonic()
                await asyncio.sleep(PERIOD_S)
                stall = loop.time() - before - PERIOD_S
                self.longest_s = max(self.longest_s, stall)
                if stall > 0.05:
                    self.over_50ms += 1
                if stall > self._warn_s:
                    log.warning("the event loop stalled for %.0f ms%s", stall * 1000, self._where)
                self._where = ""
        finally:
            stop.set()

    def _spot(self, loop_thread: int, stop: threading.Event) -> None:
        while not stop.wait(self._warn_s / 2):
            if time.monotonic() - self._tick > self._warn_s and not self._where:
                frame = sys._current_frames().get(loop_thread)  # noqa: SLF001 - the one way to see another thread's stack
                if frame is not None:
                    stack = "".join(traceback.format_stack(frame, limit=12))
                    self._where = f", in:\n{stack}"
