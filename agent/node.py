"""The worker's identity and secrets on disk: node id and bearer token, both under the state dir."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from llamafleet.common.agent_client import read_token_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeIdentity:
    node_id: str
    hostname: str
    agent_version: str
    started_at_unix_ms: int


def _write_private(path: Path, text: str) -> None:
    """Create `path` with mode 0600 (never world-readable, not even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def load_node_identity(state_dir: Path) -> NodeIdentity:
    path = state_dir / "node-id"
    try:
        node_id = path.read_text().strip()
    except FileNotFoundError:
        node_id = ""
    if not node_id:
        node_id = str(uuid.uuid4())
        path.unlink(missing_ok=True)
        _write_private(path, node_id + "\n")
    return NodeIdentity(node_id, socket.gethostname(), version("llamafleet"), int(time.time() * 1000))


def load_token(path: Path, *, create: bool) -> str:
    """Read the bearer token; with `create`, make a new random one (0600) if there is none."""
    if create and not path.exists():
        token = secrets.token_urlsafe(32)
        _write_private(path, token + "\n")
        log.info("created a new agent token in %s (give it to the controller)", path)
        return token
    token = read_token_file(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by others (mode %o): chmod 600 it", path, mode & 0o777)
    return token
