"""Pre-staging: the agent writes its rpc-servers' tensor cache entries from its own copy of a model.

llama.cpp's RPC client (protocol 7) asks a server started with `-c` for a weights tensor whose
payload is above 10 MiB by the 64-bit FNV-1a of its bytes; the server answers from
`$LLAMA_CACHE/rpc/<16 hex digits>` when that file exists and only otherwise receives the bytes.
With mmap the loader sets each tensor whole, so a tensor's entry is exactly its bytes in the GGUF.
The controller knows from the plan which tensors this node will hold and sends their byte ranges;
the agent hashes each range and writes the entries that are missing, so the load sends none of
those bytes.

Every entry is written to a hidden temp file in the cache dir, fsynced and renamed: the
rpc-server never sees half an entry (it checks no size: a truncated file would be served as the
tensor). An entry that exists with the wrong size is rewritten for the same reason, and so is one
of the right size whose content does not hash to its name (corrupted): an entry counts as
present only once it is verified, which `verified` (agent/rpc_cache.py's record of checked
entries by size and mtime) spares for an entry checked before.

With an rpc-server built with patches/llama.cpp/0003 (`references=True`), a missing entry is
written as a reference instead: `<name>.ref`, a few lines naming the model file, the span and
the file's size and mtime, which the server reads the span from. Nothing is copied, so staging a
share costs its hashing only (none when the controller sends the hashes it computed for the
coordinator), and the cache holds no second copy of the model. A torn reference (a crash while
writing one) is a malformed one, i.e. a cache miss, so references are renamed into place
without fsync. A full entry that is not intact would shadow the reference and is removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llamafleet.agent.models import ModelFile
from llamafleet.agent.rpc_cache import REFERENCE_SUFFIX, CacheWorkStopped, check_entry
from llamafleet.common.digests import FileKey, HashCancelled
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.fnv import Fnv1a, entry_name, hash_range, read_chunks
from llamafleet.common.wire_limits import MAX_RANGES

# llama.cpp: `size > HASH_THRESHOLD` with HASH_THRESHOLD = 10 MiB; smaller payloads are always sent.
HASH_THRESHOLD = 10 * 1024 * 1024
CHUNK_BYTES = 64 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class StagingRefused(LlamafleetError):
    """This agent cannot stage that model now (it does not hold it, or cannot hash)."""


@dataclass(frozen=True)
class ByteRange:
    offset: int
    size: int
    fnv1a: int | None = None  # the range's hash when the caller knows it (the controller computed it)


@dataclass(frozen=True)
class StageResult:
    staged: int = 0
    present: int = 0
    skipped_small: int = 0
    rewritten: int = 0
    bytes_written: int = 0
    cached_bytes: int = 0
    seconds: float = 0.0
    entries: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()  # of `entries`, in the same order
    referenced: int = 0  # of `staged`: written as references to the model file (no bytes copied)


def check_request(sha256: str, ranges: Sequence[ByteRange]) -> None:
    """The checks that need no file: a one-line UsageError (INVALID_ARGUMENT) on bad input."""
    if not _SHA256.match(sha256):
        raise UsageError(f"sha256 must be 64 lowercase hex digits, not {sha256[:80]!r}")
    if not ranges:
        raise UsageError("no byte ranges to stage")
    if len(ranges) > MAX_RANGES:
        raise UsageError(f"at most {MAX_RANGES} byte ranges per call, not {len(ranges)}")
    for i, r in enumerate(ranges):
        if r.size <= 0:
            raise UsageError(f"range #{i} (offset {r.offset}) is empty")


def find_model(files: Sequence[ModelFile], sha256: str) -> ModelFile:
    """The ready model file with that sha256, else a one-line refusal (FAILED_PRECONDITION)."""
    matches = [f for f in files if f.sha256 == sha256 and f.state == "ready"]
    if matches:
        return matches[0]
    if any(f.state == "hashing" for f in files):
        raise StagingRefused(f"no model file with sha256 {sha256[:12]}… confirmed yet: this agent is still hashing "
                             "its models dir")
    raise StagingRefused(f"this agent holds no model file with sha256 {sha256[:12]}…")


def check_ranges(model: ModelFile, ranges: Sequence[ByteRange]) -> None:
    for i, r in enumerate(ranges):
        if r.offset + r.size > model.size_bytes:
            raise UsageError(f"range #{i} (offset {r.offset}, {r.size} bytes) runs past the end of {model.name} "
                             f"({model.size_bytes} bytes)")


def _copy_range(fd: int, r: ByteRange, target: Path, buffer: bytearray, stop: threading.Event) -> None:
    """Write the range to `target` atomically: temp file in the same dir, fsync, rename, fsync the dir."""
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".stage-{target.name}-")
    view = memoryview(buffer)
    try:
        for got in read_chunks(fd, r.offset, r.size, buffer, stop):
            written = 0
            while written < got:
                written += os.write(handle, view[written:got])
        os.fsync(handle)
        os.close(handle)
        handle = -1
        os.replace(temp, target)
    except BaseException:
        if handle >= 0:
            os.close(handle)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def reference_text(model: ModelFile, r: ByteRange) -> str:
    """What patches/llama.cpp/0003's rpc-server reads from `<entry>.ref`."""
    if "\n" in model.path:
        raise StagingRefused(f"{model.name}: a path with a newline cannot be written into a reference entry")
    return f"llama-rpc-ref 1\n{model.path}\n{r.offset} {r.size} {model.size_bytes} {model.mtime_ns}\n"


def _write_reference(target: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".stage-{target.name}-")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _reference_present(target: Path, text: str) -> bool:
    try:
        return target.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


def _intact(target: Path, size: int, verified: dict[str, tuple[int, int]], buffer: bytearray,
            fnv: Fnv1a, stop: threading.Event) -> bool:
    """Is the entry at `target` `size` bytes that hash to its name? Hashed only when `verified`
    holds no check of this version of it; a good check is added there."""
    try:
        stat = target.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != size:
        return False
    if verified.get(target.name) == (stat.st_size, stat.st_mtime_ns):
        return True
    try:
        checked = check_entry(target, fnv, buffer, stop)
    except CacheWorkStopped:
        raise HashCancelled from None
    if checked is None or not checked[0] or checked[1].st_size != size:
        return False
    verified[target.name] = (checked[1].st_size, checked[1].st_mtime_ns)
    return True


def stage(model: ModelFile, ranges: Sequence[ByteRange], cache_dir: Path, fnv: Fnv1a,
          stop: threading.Event | None = None, threshold: int = HASH_THRESHOLD,
          chunk_bytes: int = CHUNK_BYTES, hashes: dict[tuple[FileKey, int, int], int] | None = None,
          on_entry: Callable[[str], None] = lambda _: None,
          verified: dict[str, tuple[int, int]] | None = None, references: bool = False) -> StageResult:
    """Write the missing (or bad) cache entries for `ranges` of `model` into `cache_dir` (blocking: run it in a thread).

    `hashes`: remembered FNV-1a per (file version, offset, size), so staging a model again costs a
    stat per entry instead of reading the file. `verified`: entry name → (size, mtime_ns) of
    checked entries (updated with what this call checks and writes); without it every present
    entry is hashed. `references`: the rpc-server reads reference entries (patch 0003): write
    those instead of copies."""
    stop = stop or threading.Event()
    verified = {} if verified is None else verified
    check_ranges(model, ranges)
    started = time.monotonic()
    fnv.ensure()  # FnvUnavailable before any file work
    if FileKey.of(Path(model.path)) != model.key:
        raise StagingRefused(f"{model.name} changed since it was hashed: staging waits for the next rescan")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staged = present = skipped = rewritten = written = cached = referenced = 0
    entries: list[str] = []
    sizes: list[int] = []
    buffer = bytearray(min(chunk_bytes, max((r.size for r in ranges), default=1)))
    fd = os.open(model.path, os.O_RDONLY)
    try:
        for r in ranges:
            if r.size <= threshold:
                skipped += 1
                continue
            memo = (model.key, r.offset, r.size)
            value = r.fnv1a if r.fnv1a is not None else hashes.get(memo) if hashes is not None else None
            if value is None:
                value = hash_range(fd, r.offset, r.size, fnv, buffer, stop)
                if hashes is not None:
                    hashes[memo] = value
            name = entry_name(value)
            entries.append(name)
            sizes.append(r.size)
            target = cache_dir / name
            existing = target.exists()
            if _intact(target, r.size, verified, buffer, fnv, stop):
                present += 1
            elif references:
                reference = cache_dir / (name + REFERENCE_SUFFIX)
                text = reference_text(model, r)
                if not existing and _reference_present(reference, text):
                    present += 1
                else:
                    if existing:
                        target.unlink(missing_ok=True)  # the server would read it before the reference
                        rewritten += 1
                    _write_reference(reference, text)
                    staged += 1
                    referenced += 1
                    on_entry(name)
            else:
                _copy_range(fd, r, target, buffer, stop)
                if FileKey.of(Path(model.path)) != model.key:
                    # Rewritten in place while we read it: the entry may hold bytes that are not
                    # the ones its name was hashed from. Never leave such an entry behind.
                    target.unlink(missing_ok=True)
                    raise StagingRefused(f"{model.name} changed while it was being staged: staging waits "
                                         "for the next rescan")
                written_stat = target.stat()
                verified[name] = (written_stat.st_size, written_stat.st_mtime_ns)  # the bytes we hashed
                staged += 1
                rewritten += existing
                written += r.size
                on_entry(name)
            cached += r.size
    finally:
        os.close(fd)
    return StageResult(staged, present, skipped, rewritten, written, cached, time.monotonic() - started,
                       tuple(entries), tuple(sizes), referenced)
