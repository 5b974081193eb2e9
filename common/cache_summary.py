"""One line for people from an rpc cache summary's JSON, as the agent (`status`, `cache ls`) and the
controller (`nodes`) print it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamafleet.common.units import format_size


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summary_line(doc: Mapping[str, Any]) -> str:
    """One line for people from a summary's JSON (`status`, `nodes`, `cache ls`)."""
    cap = f"of {format_size(int(doc['max_bytes']))}" if doc["max_bytes"] else "(no cap)"
    line = (f"{format_size(int(doc['used_bytes']))} {cap} in {_count(doc['entries'], 'entry', 'entries')} "
            f"({_count(doc['models'], 'staged model', 'staged models')}, "
            f"{format_size(int(doc['in_use_bytes']))} in use")
    if doc["unverified"]:
        line += f", {doc['unverified']} not verified yet"
    line += f"); {doc['corrupt_removed']} corrupt removed, {doc['evictions']} evicted"
    if doc["evictions"]:
        line += f" ({format_size(int(doc['evicted_bytes']))})"
    return line + (f"  [{doc['error']}]" if doc.get("error") else "")
