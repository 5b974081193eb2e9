"""Pre-computed FNV-1a of a model's weight tensors, for a coordinator built with the patch set.

Stock llama.cpp hashes every weight tensor above 10 MiB on the coordinator, a byte at a time,
before it asks an rpc-server whether its cache holds it: with warm caches that is most of a load
(13 s of CPU for an 8.5 GB model). The patched llama-server (patches/llama.cpp/0002) reads the
hashes from the file in $LLAMA_RPC_TENSOR_HASHES instead, so a cache hit never touches the bytes.

The file is computed once per model file version (path, size, mtime_ns) into
STATE/tensor-hashes/<digest of that identity>.txt, and read again by every later load. Tensors
are hashed in parallel threads (the C FNV-1a releases the GIL; `WORKERS` at once, beyond which the
disk is the limit), never on the event loop, and the file is written atomically. Its header carries
the model file's size and mtime: llama.cpp itself compares them with the file it maps, so a file
changed since is never a wrong tensor, only a load that hashes as before. If the file changed
while we read it, the result is thrown away.

Without a C compiler (FnvUnavailable) or on any error, the coordinator simply runs without the
file, as a stock one would; the reason is logged once per file version.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llamafleet.common.digests import FileKey, HashCancelled
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.fnv import Fnv1a, hash_range
from llamafleet.common.llamacpp.tensor_hash_file import parse, render
from llamafleet.controller.gguf import GGUFHeader
from llamafleet.controller.prestage import HASH_THRESHOLD, every_large_tensor

log = logging.getLogger(__name__)
WORKERS = min(8, os.cpu_count() or 1)
CHUNK_BYTES = 16 * 1024 * 1024
FILES_KEPT = 64  # hash files of other model versions past this many are removed, oldest first


@dataclass(frozen=True)
class HashFile:
    path: Path  # for $LLAMA_RPC_TENSOR_HASHES
    values: dict[tuple[int, int], int]  # (file offset, size) → FNV-1a, for the agents' pre-staging


def hash_file_name(key: FileKey) -> str:
    return hashlib.sha256(f"{key.path}\0{key.size}\0{key.mtime_ns}".encode()).hexdigest()[:24] + ".txt"


class TensorHashes:
    def __init__(self, state_dir: Path, fnv: Fnv1a | None = None, workers: int = WORKERS,
                 threshold: int = HASH_THRESHOLD) -> None:
        self.directory = state_dir / "tensor-hashes"
        self.threshold = threshold
        self._fnv = fnv or Fnv1a(state_dir / "fnv1a")
        self._workers = workers
        # One computation at a time (each uses `workers` threads itself); a second request for the
        # same file version waits for the first.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensor-hashes")
        self._pending: dict[FileKey, concurrent.futures.Future[HashFile | None]] = {}
        self._failed: dict[FileKey, str] = {}
        self._stop = threading.Event()

    def path_for(self, model: Path) -> Path:
        return self.directory / hash_file_name(FileKey.of(model))

    async def ensure(self, model: Path, header: GGUFHeader) -> HashFile | None:
        """The hash file for `model`, computed first if it is missing; None when it cannot be made."""
        key = await asyncio.to_thread(FileKey.of, model)
        target = self.directory / hash_file_name(key)
        try:
            return HashFile(target, parse(await asyncio.to_thread(target.read_text)))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("recomputing %s: %s", target, exc)
        pending = self._submit(key, header, target)
        if pending is None:
            return None
        # Shielded: a load that is cancelled leaves the computation to the next one.
        return await asyncio.shield(asyncio.wrap_future(pending))

    def prefetch(self, model: Path, header: GGUFHeader) -> None:
        """Start computing the hashes in the background if they are not there yet (e.g. when the
        planner first sees nodes that hold the model), so that its first load need not wait."""
        try:
            key = FileKey.of(model)
        except OSError:
            return
        target = self.directory / hash_file_name(key)
        if not target.is_file():
            self._submit(key, header, target)

    def _submit(self, key: FileKey, header: GGUFHeader, target: Path) -> concurrent.futures.Future[HashFile | None] | None:
        if key in self._failed or self._stop.is_set():
            return None
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pool.submit(self._compute_logged, key, header, target)
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        return pending

    def _compute_logged(self, key: FileKey, header: GGUFHeader, target: Path) -> HashFile | None:
        try:
            return self._compute(key, header, target)
        except HashCancelled:
            return None
        except (LlamafleetError, OSError) as exc:
            why = exc.message if isinstance(exc, LlamafleetError) else f"{exc.strerror or exc}"
            self._failed[key] = why
            log.warning("no pre-computed tensor hashes for %s (the coordinator hashes them itself): %s", key.path, why)
            return None

    def _compute(self, key: FileKey, header: GGUFHeader, target: Path) -> HashFile | None:
        started = time.monotonic()
        self._fnv.ensure()
        tensors = every_large_tensor(header, self.threshold)
        fd = os.open(key.path, os.O_RDONLY)
        try:
            def one(offset: int, size: int) -> tuple[int, int, int]:
                buffer = bytearray(min(CHUNK_BYTES, size))
                return offset, size, hash_range(fd, offset, size, self._fnv, buffer, self._stop)

            with concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="tensor-hash") as pool:
                ranges = list(pool.map(lambda t: one(*t), tensors))
        finally:
            os.close(fd)
        if FileKey.of(Path(key.path)) != key:
            log.info("%s changed while its tensors were hashed: not kept", key.path)
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=self.directory, prefix=".hashes-")
        try:
            with os.fdopen(handle, "w") as out:
                out.write(render(key, ranges))
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        log.info("pre-computed %d tensor hashes (%.1f GB) of %s in %.2fs", len(ranges),
                 sum(size for _, size, _ in ranges) / 1e9, key.path, time.monotonic() - started)
        self._prune(keep=target)
        return HashFile(target, {(offset, size): value for offset, size, value in ranges})

    def _prune(self, keep: Path) -> None:
        files = sorted((p for p in self.directory.glob("*.txt") if p != keep), key=lambda p: p.stat().st_mtime)
        for old in files[: max(0, len(files) + 1 - FILES_KEPT)]:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        """Stops a computation under way at its next chunk (the controller is stopping)."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
