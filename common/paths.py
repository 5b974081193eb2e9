"""Default locations, following systemd's directories when run as a unit."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir(program: str) -> Path:
    """$STATE_DIRECTORY under systemd, else $XDG_STATE_HOME/llamafleet/<program>."""
    if systemd_dir := os.environ.get("STATE_DIRECTORY"):
        # systemd may pass several, colon-separated: the first is ours.
        return Path(systemd_dir.split(":")[0])
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "llamafleet" / program


def default_cache_dir(program: str) -> Path:
    """$CACHE_DIRECTORY under systemd, else $XDG_CACHE_HOME/llamafleet/<program>."""
    if systemd_dir := os.environ.get("CACHE_DIRECTORY"):
        return Path(systemd_dir.split(":")[0])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llamafleet" / program
