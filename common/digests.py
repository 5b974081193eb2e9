"""sha256 of model files, computed once per file version and remembered across restarts.

A file version is (path, size, mtime_ns): a file copied over, truncated or rewritten gets a new
key and is hashed again; an unchanged one is never read twice, not even after a restart. The
hash of a multi-GB GGUF takes seconds to minutes, so callers run `sha256_file` in a thread, and
it reads in chunks and stops early when asked (a daemon must not wait minutes to exit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
CHUNK_BYTES = 4 * 1024 * 1024
# The cache holds one entry per file we index; past this many it is a runaway, not a store.
MAX_CACHE_ENTRIES = 10_000
CACHE_VERSION = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class HashCancelled(Exception):
    """The caller asked the hash to stop (shutting down)."""


@dataclass(frozen=True)
class FileKey:
    path: str  # absolute, as indexed (a symlink stays itself: its target may change under it)
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileKey:
        stat = path.stat()  # follows symlinks: the bytes we hash are the target's
        return cls(str(path), stat.st_size, stat.st_mtime_ns)


def sha256_file(path: Path, stop: threading.Event | None = None) -> str:
    """Hex sha256 of the file; raises HashCancelled when `stop` is set part-way."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            if stop is not None and stop.is_set():
                raise HashCancelled(str(path))
            digest.update(chunk)
    return digest.hexdigest()


class DigestCache:
    """FileKey → sha256, kept in one JSON file (written atomically: a crash leaves the old one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # hash threads write while the loop reads
        self._entries: dict[FileKey, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            document = json.loads(self.path.read_text())
            entries = document["entries"] if document.get("version") == CACHE_VERSION else []
            for entry in entries[:MAX_CACHE_ENTRIES]:
                key = FileKey(str(entry["path"]), int(entry["size"]), int(entry["mtime_ns"]))
                if isinstance(entry["sha256"], str) and _HEX64.match(entry["sha256"]):
                    self._entries[key] = entry["sha256"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # A damaged cache costs a rehash, never a wrong answer or a failed start.
            log.warning("ignoring the digest cache %s (%s): files will be hashed again", self.path, exc)
            self._entries = {}

    def get(self, key: FileKey) -> str | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: FileKey, sha256: str) -> None:
        with self._lock:
            self._entries[key] = sha256

    def keep_only(self, keys: set[FileKey]) -> None:
        """Forget versions no longer present (a file replaced or removed)."""
        with self._lock:
            self._entries = {k: v for k, v in self._entries.items() if k in keys}

    def save(self) -> None:
        with self._lock:
            items = sorted(self._entries.items(), key=lambda kv: kv[0].path)[:MAX_CACHE_ENTRIES]
        document = {"version": CACHE_VERSION, "entries": [
            {"path": k.path, "size": k.size, "mtime_ns": k.mtime_ns, "sha256": v} for k, v in items]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(document))
        os.replace(temporary, self.path)
