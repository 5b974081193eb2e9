"""GGUF header read of a real model: llamafleet's reader vs gguf-py's GGUFReader, in one run.

    .venv/bin/python bench/gguf_read.py [MODEL.gguf]   # default: $LLAMAFLEET_TEST_MODEL

Prints the median of several runs of ours, one run of GGUFReader (it takes seconds), the ratio,
and ours against the planning target (well under 100 ms).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from gguf import GGUFReader

from llamafleet.controller.gguf import read_gguf_header

TARGET_MS = 100.0


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["LLAMAFLEET_TEST_MODEL"])
    ours = []
    for _ in range(7):
        started = time.perf_counter()
        header = read_gguf_header(path)
        ours.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    oracle = GGUFReader(path)
    theirs = (time.perf_counter() - started) * 1000
    assert len(oracle.tensors) == len(header.tensors)
    median = statistics.median(ours)
    print(f"{path.name}: {path.stat().st_size / 1e6:.0f} MB, {len(header.tensors)} tensors, "
          f"{len(header.metadata)} metadata keys")
    print(f"  llamafleet reader   {median:8.1f} ms (median of {len(ours)}; min {min(ours):.1f})")
    print(f"  gguf.GGUFReader     {theirs:8.1f} ms (one run)")
    print(f"  speed-up            {theirs / median:8.0f}x")
    print(f"  vs target {TARGET_MS:.0f} ms      {median / TARGET_MS:8.2f} of the budget")
    return 0 if median < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
