"""Sizes and durations as operators write them ("120MiB", "20GiB", "5m", "1h30m") and as we print them."""

from __future__ import annotations

import re

from llamafleet.common.errors import UsageError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION_TEXT = 32


def parse_duration(text: str | int | float) -> float:
    """Seconds in `text`: a number of seconds, or a Go-style duration ("5m", "1h30m", "-1s")."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text != text or text in (float("inf"), float("-inf")):
            raise UsageError("a duration must be finite")
        return float(text)
    if not isinstance(text, str) or len(text) > MAX_DURATION_TEXT:
        raise UsageError(f"not a duration: {text!r} (examples: 300, \"5m\", \"1h30m\")")
    stripped = text.strip()
    try:
        return float(stripped)
    except ValueError:
        # Not a bare number: read it as a duration with units below.
        pass
    sign = -1.0 if stripped.startswith("-") else 1.0
    body = stripped.lstrip("+-")
    parts = _DURATION_PART.findall(body)
    if not body or "".join(n + u for n, u in parts) != body:
        raise UsageError(f"not a duration: {text!r} (examples: 300, \"5m\", \"1h30m\")")
    return sign * sum(float(n) * _DURATION_UNIT_S[u] for n, u in parts)


def parse_size(text: str | int) -> int:
    """Bytes in `text`; decimal (GB) and binary (GiB) units, case-insensitive."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UsageError(f"size must not be negative: {text}")
        return text
    match = _SIZE.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise UsageError(f"not a size: '{text}' (examples: 120MiB, 20GiB, 1.5GB, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: int) -> str:
    """1536 MiB → '1.5 GiB'; binary units, one decimal."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
