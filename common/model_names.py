"""The names of model files in a models directory, as the agent indexes them and the controller
pushes them: one rule on both sides, so the controller refuses what an agent would refuse."""

from __future__ import annotations

import re

from llamafleet.common.errors import UsageError

MAX_NAME_CHARS = 255
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")


def check_name(name: str) -> None:
    """NAME or FOLDER/NAME, as the index names files; a UsageError (INVALID_ARGUMENT) otherwise."""
    parts = name.split("/")
    if (not name or len(name) > MAX_NAME_CHARS or len(parts) > 2 or ".." in name
            or not all(_SEGMENT.match(part) for part in parts)):
        raise UsageError(f"invalid model file name {name[:80]!r}: use NAME or FOLDER/NAME of letters, digits, "
                         "'.', '_' and '-' (no '..', no leading '.' or '/')")
