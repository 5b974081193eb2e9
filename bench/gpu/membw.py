"""GPU memory bandwidth, measured: a large device-to-device copy, bytes read plus bytes written.

This is the ceiling the decode roofline divides by (decoding a dense model reads every weight
once per token). Uses PyTorch if it is installed; prints one JSON object.

    python bench/gpu/membw.py [--gib 2] [--reps 30]

Nothing here is imported by the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def measure(gib: float, reps: int) -> dict[str, object]:
    """Median bandwidth of `reps` copies of a `gib` GiB buffer (events around each copy)."""
    import torch

    n = int(gib * 1024**3)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times_ms = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    if not torch.equal(src[:1024], dst[:1024]):
        raise RuntimeError("the copy did not copy")
    ms = statistics.median(times_ms)
    return {
        "method": f"torch device-to-device copy of {gib:g} GiB, median of {reps}, bytes read + written",
        "device": torch.cuda.get_device_name(0),
        "copy_ms_median": round(ms, 4),
        "bandwidth_bytes_per_s": 2 * n / (ms / 1000),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    try:
        result = measure(args.gib, args.reps)
    except ImportError as exc:
        print(json.dumps({"error": f"PyTorch is not installed: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
