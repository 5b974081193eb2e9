"""The agent's model store: the GGUF files in `--models-dir`, by name, size and sha256.

What is indexed: `DIR/*.gguf` and `DIR/*/*.gguf` (one level of subfolders, the way operators
group files by family or quantisation; the name is the path below DIR without `.gguf`, e.g.
`gemma` or `llama3/8b-q8_0`). Symlinks are followed (a shared NFS mount, a file kept elsewhere);
hidden names (`.x.gguf`, e.g. a copy in progress) are not indexed.

Bounds: at most MAX_FILES files, taken in name order; the rest are counted in `omitted` (and
logged), never indexed, so a directory of a million files costs a listing and nothing more.
Names longer than MAX_NAME_CHARS are skipped and counted the same way.

Hashing: a file is reported at once with state `hashing`; its sha256 is computed in a thread,
one file at a time (the disk is the bottleneck; two at once would only seek), and remembered in
STATE/model-digests.json by (path, size, mtime_ns), so a restart does not read the file again. A
rescan every `rescan_s` (and at start) picks up added, removed and replaced files.

A file the agent received itself (agent/pull.py) is already verified: `adopt` puts it in place
and lists it READY at once, without waiting for a rescan or reading it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.digests import DigestCache, FileKey, HashCancelled, sha256_file
from llamafleet.common.model_names import MAX_NAME_CHARS

log = logging.getLogger(__name__)
MAX_FILES = 1000
DIGEST_CACHE = "model-digests.json"


@dataclass(frozen=True)
class ModelFile:
    name: str  # path below the models dir, without `.gguf`
    path: str
    size_bytes: int
    mtime_ns: int
    sha256: str  # "" until known
    state: str  # hashing, ready, error
    error: str = ""

    @property
    def key(self) -> FileKey:
        return FileKey(self.path, self.size_bytes, self.mtime_ns)


@dataclass(frozen=True)
class ScanResult:
    found: tuple[tuple[str, FileKey], ...]  # (name, key), in name order, at most MAX_FILES
    omitted: int  # files past the bound or with too long a name


def _candidates(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    try:
        top = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot list the models dir %s: %s", root, exc)
        return out
    for entry in top:
        if entry.name.startswith("."):
            continue
        if entry.name.endswith(".gguf"):
            out.append((entry.name.removesuffix(".gguf"), Path(entry.path)))
        elif entry.is_dir():  # follows a symlinked folder too: the operator put it there
            try:
                inner = sorted(os.scandir(entry.path), key=lambda e: e.name)
            except OSError as exc:
                log.warning("cannot list %s: %s", entry.path, exc)
                continue
            out += [(f"{entry.name}/{e.name.removesuffix('.gguf')}", Path(e.path)) for e in inner
                    if e.name.endswith(".gguf") and not e.name.startswith(".")]
    return sorted(out)


def scan(root: Path, max_files: int = MAX_FILES) -> ScanResult:
    """List the store (blocking: run it in a thread)."""
    found: list[tuple[str, FileKey]] = []
    omitted = 0
    for name, path in _candidates(root):
        if len(name) > MAX_NAME_CHARS or len(found) >= max_files:
            omitted += 1
            continue
        try:
            if not path.is_file():
                continue
            found.append((name, FileKey.of(path)))
        except OSError:
            # A dangling symlink or a file removed while we list: not a model we hold.
            continue
    return ScanResult(tuple(found), omitted)


class ModelIndex:
    def __init__(self, root: Path, state_dir: Path, rescan_s: float = 30.0, max_files: int = MAX_FILES,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.root = root.absolute()
        self.rescan_s = rescan_s
        self.max_files = max_files
        self._cache = DigestCache(state_dir / DIGEST_CACHE)
        self._on_change = on_change
        self._scan = ScanResult((), 0)
        self._errors: dict[FileKey, str] = {}
        self._files: tuple[ModelFile, ...] = ()
        self._stop = threading.Event()  # tells a hash thread to give up (the agent is stopping)
        # Held while a listing is taken and applied, and while `adopt` puts a file in place: a
        # listing made before the file arrived must not be applied after it (and forget its digest).
        self._listing = asyncio.Lock()

    @property
    def files(self) -> tuple[ModelFile, ...]:
        return self._files

    @property
    def omitted(self) -> int:
        return self._scan.omitted

    def _publish(self) -> None:
        files = []
        for name, key in self._scan.found:
            sha = self._cache.get(key)
            error = self._errors.get(key, "")
            state = "ready" if sha else "error" if error else "hashing"
            files.append(ModelFile(name, key.path, key.size, key.mtime_ns, sha or "", state, error))
        published = tuple(files)
        if published != self._files:
            self._files = published
            self._on_change()

    async def refresh(self) -> None:
        """One rescan, then the hash of every file not known yet, publishing after each step."""
        async with self._listing:
            result = await asyncio.to_thread(scan, self.root, self.max_files)
            if result.omitted and result.omitted != self._scan.omitted:
                log.warning("models dir %s: %d file(s) not indexed (more than %d files, or a name longer than %d "
                            "characters)", self.root, result.omitted, self.max_files, MAX_NAME_CHARS)
            self._scan = result
            present = {key for _, key in result.found}
            self._errors = {k: v for k, v in self._errors.items() if k in present}
            self._cache.keep_only(present)
            self._publish()
        for _, key in result.found:
            if self._cache.get(key) is not None:
                continue  # an unreadable file is tried again on every rescan: a chmod fixes it
            try:
                sha = await asyncio.to_thread(self._hash, key)
            except OSError as exc:
                self._errors[key] = f"cannot read: {exc.strerror or exc}"
                log.warning("cannot hash %s: %s", key.path, exc)
            else:
                self._errors.pop(key, None)
                if sha is not None:
                    self._cache.put(key, sha)
                    await asyncio.to_thread(self._cache.save)
            self._publish()
        await asyncio.to_thread(self._cache.save)

    async def adopt(self, name: str, sha256: str, put_in_place: Callable[[], FileKey]) -> ModelFile:
        """List a file whose sha256 is known (it was verified as it arrived) as READY at once.

        `put_in_place` (run in a thread) renames it to its indexed path and returns its key; no
        listing runs meanwhile, so none can see the file before its digest is known."""
        async with self._listing:
            key = await asyncio.to_thread(put_in_place)
            self._cache.put(key, sha256)
            found = sorted([(n, k) for n, k in self._scan.found if n != name] + [(name, key)])
            past_bound = max(len(found) - self.max_files, 0)
            self._scan = ScanResult(tuple(found[:self.max_files]), self._scan.omitted + past_bound)
            self._publish()
        try:
            await asyncio.to_thread(self._cache.save)
        except OSError as exc:
            # The file is in place and listed; only a restart would hash it again.
            log.warning("cannot save the digest of %s: %s", key.path, exc)
        return next((f for f in self._files if f.name == name),
                    ModelFile(name, key.path, key.size, key.mtime_ns, sha256, "ready"))

    def _hash(self, key: FileKey) -> str | None:
        sha = sha256_file(Path(key.path), self._stop)
        # Changed while we read it: the digest is of no version we know; the next scan rehashes.
        return sha if FileKey.of(Path(key.path)) == key else None

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.refresh()
                except HashCancelled:
                    return
                except OSError as exc:
                    # E.g. the cache cannot be written (disk full): say so, keep serving, retry.
                    log.warning("models dir %s: %s", self.root, exc)
                await asyncio.sleep(self.rescan_s)
        except asyncio.CancelledError:
            # Stopped: a hash in its thread gives up. Not on a failure: run again (supervised), it hashes on.
            self._stop.set()
            raise
