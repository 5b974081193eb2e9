"""Which nodes hold a model: the agents' model files matched against the controller's GGUF.

Matching is by size first and confirmed by sha256: a node holds the model when one of its files
has the model file's size and, once both are known, its sha256. Size alone is a hint, never a
verdict (two quantisations can have one size by chance). The controller hashes its own file only
when some node reports a file of that size (in a fleet where nobody holds it, nothing is read),
once per file version (path, size, mtime_ns): in a thread, remembered in STATE/model-digests.json.
Until that hash is known, no node counts as a holder, and the plan says it is being computed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.digests import DigestCache, FileKey, HashCancelled, sha256_file
from llamafleet.common.errors import LlamafleetError
from llamafleet.controller.placement.nodes import NodeView

log = logging.getLogger(__name__)
DIGEST_CACHE = "model-digests.json"


class DigestUnavailable(LlamafleetError):
    """The controller cannot hash its model file (unreadable, or it is stopping)."""


@dataclass(frozen=True)
class Holders:
    sha256: str  # of the controller's file; "" while unknown (or not needed: no size matches)
    addresses: frozenset[str]  # nodes with a file of that sha256
    note: str  # one line for the plan's reasons

    @classmethod
    def none(cls, note: str) -> Holders:
        return cls("", frozenset(), note)


class ModelDigests:
    """sha256 of the controller's model files: known, or being computed in the background."""

    def __init__(self, state_dir: Path) -> None:
        self._cache = DigestCache(state_dir / DIGEST_CACHE)
        # One thread: hashes queue behind each other instead of competing for the disk.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-digest")
        self._pending: dict[FileKey, concurrent.futures.Future[None]] = {}
        self._errors: dict[FileKey, str] = {}
        self._stop = threading.Event()

    def digest(self, path: Path) -> str | None:
        """The file's sha256 if known; otherwise start computing it (once) and answer None."""
        key = FileKey.of(path)
        if (known := self._cache.get(key)) is not None:
            return known
        if key not in self._pending and key not in self._errors and not self._stop.is_set():
            self._pending[key] = self._pool.submit(self._compute, key)
        return None

    def known(self, path: Path) -> str | None:
        """The file's sha256 if known; never starts a hash (listings must not read every file)."""
        return self._cache.get(FileKey.of(path))

    async def sha256_of(self, path: Path) -> str:
        """The file's sha256, waiting for the digest thread to compute it when it is not known."""
        while (sha := self.digest(path)) is None:
            key = FileKey.of(path)
            if key in self._errors:
                raise DigestUnavailable(self._errors[key])
            if self._stop.is_set():
                raise DigestUnavailable("the controller is stopping")
            pending = self._pending.get(key)
            if pending is not None:
                # Its outcome is read from the cache or the errors on the next turn of the loop.
                await asyncio.wrap_future(pending)
            else:
                await asyncio.sleep(0.1)  # hashed while it changed: the next turn hashes it again
        return sha

    async def settle(self, paths: Iterable[Path], timeout_s: float) -> None:
        """Start hashing whichever of `paths` is not known, and wait up to `timeout_s` for those.

        Never cancels a hash: one not done by then finishes in the background for the next ask.
        """
        waiting = []
        for path in paths:
            with contextlib.suppress(OSError):  # a file gone since listing: nothing to wait for
                if self.digest(path) is None and (pending := self._pending.get(FileKey.of(path))) is not None:
                    waiting.append(asyncio.wrap_future(pending))
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)

    def error(self, path: Path) -> str:
        return self._errors.get(FileKey.of(path), "")

    def _compute(self, key: FileKey) -> None:
        try:
            sha = sha256_file(Path(key.path), self._stop)
            if FileKey.of(Path(key.path)) == key:  # unchanged while read: the digest is this version's
                self._cache.put(key, sha)
                self._cache.save()
        except HashCancelled:
            return
        except OSError as exc:
            self._errors[key] = f"cannot hash {key.path}: {exc.strerror or exc}"
            log.warning("%s", self._errors[key])
        finally:
            self._pending.pop(key, None)

    def wait(self, timeout_s: float) -> None:
        """For tests: until every hash asked for so far is done."""
        concurrent.futures.wait(list(self._pending.values()), timeout=timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def find_holders(path: Path, nodes: Sequence[NodeView], digests: ModelDigests) -> Holders:
    size = path.stat().st_size
    same_size = {n.address for n in nodes for f in n.model_files if f.size_bytes == size}
    if not same_size:
        return Holders.none("no node holds the model's file")
    sha = digests.digest(path)
    if sha is None:
        why = digests.error(path) or "the controller is computing the model file's sha256"
        return Holders.none(f"{len(same_size)} node(s) hold a file of the model's size; {why}: holders not "
                            "confirmed yet")
    addresses = frozenset(n.address for n in nodes for f in n.model_files if f.size_bytes == size and f.sha256 == sha)
    hashing = {n.address for n in nodes for f in n.model_files if f.size_bytes == size and not f.sha256} - addresses
    note = f"{len(addresses)} node(s) hold the model (sha256 {sha[:12]}…)"
    if hashing:
        note += f"; {len(hashing)} more still hashing a file of its size"
    return Holders(sha, addresses, note)
