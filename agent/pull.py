"""Pulls into the models dir: the controller pushes a model file, resumably, verified by sha256.

The controller asks first (`PrepareModelPush{name, sha256, size}`): the answer says whether a
file with that sha256 and size is held already (then nothing is sent) and how many bytes of this
very file an interrupted push left behind (the offset to resume at). `PushModel` then sends a
header; `Receiver.begin` opens the file at its offset (every refusal happens there, answered
before the caller sends a byte) and `Push.receive` takes the bytes from that offset on.

On disk a file in transit is `DIR/[FOLDER/].NAME.gguf.partial`, hidden so the index never lists
it, beside `.NAME.gguf.partial.json`, written before the first byte, which names the sha256 and
size it is to become. A later push of the same file resumes at the partial's length; a push of
another file under that name starts over. The sha256 is computed as the bytes arrive (the kept
prefix of a resumed file is read once first), in a thread. A mismatch deletes the partial and
its record: nothing usable is left. A match is fsynced, renamed to `NAME.gguf` and adopted by
the index, READY at once (agent/models.py), which tells the controller through WatchStatus.

Refused before a byte is written, each with one line: a name that is not NAME or FOLDER/NAME
(letters, digits, '.', '_', '-'; no '..', no hidden or absolute names), a different file already
at DIR/NAME.gguf (never overwritten), a push of the same name under way (one at a time per
file), and less free space than the bytes still to come (statvfs of the target's directory).

The partial is locked (POSIX lockf, which NFS carries) while a push writes it, so agents that
share one models dir (a NAS mount) cannot interleave their bytes: the second is refused as busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from llamafleet.agent.models import ModelFile, ModelIndex
from llamafleet.common.digests import FileKey
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.model_names import check_name
from llamafleet.common.units import format_size

log = logging.getLogger(__name__)
T = TypeVar("T")
# 1 PiB: no model file is near it; a larger announced size is a broken or hostile controller.
MAX_FILE_BYTES = 2**50
# A push that sends nothing for this long is abandoned (a half-open connection would otherwise
# hold the file's turn for ever); its bytes are kept for a resume.
IDLE_TIMEOUT_S = 60.0
HASH_CHUNK_BYTES = 8 * 1024 * 1024
RECORD_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PushRefused(LlamafleetError):
    """This agent cannot take the file now (no models dir, a file there not hashed yet…)."""


class PushBusy(LlamafleetError):
    """A push of the same name is under way."""


class PushInterrupted(LlamafleetError):
    """The stream ended or stalled before the last byte; what arrived is kept for a resume."""


class PushStopped(LlamafleetError):
    """The agent is stopping."""


class NotEnoughSpace(LlamafleetError):
    """The file system lacks room for the bytes still to come."""


class NameTaken(LlamafleetError):
    """A different file is already at DIR/NAME.gguf."""


class DigestMismatch(LlamafleetError):
    """The bytes received are not the file announced; nothing was kept."""


@dataclass(frozen=True)
class Offer:
    """The file the controller means to push."""

    name: str
    sha256: str
    size_bytes: int

    def check(self) -> None:
        check_name(self.name)
        if not _SHA256.match(self.sha256):
            raise UsageError(f"sha256 must be 64 lowercase hex digits, not {self.sha256[:80]!r}")
        if not 0 < self.size_bytes <= MAX_FILE_BYTES:
            raise UsageError(f"size_bytes must be 1..{MAX_FILE_BYTES}, not {self.size_bytes}")


@dataclass(frozen=True)
class Prepared:
    have_bytes: int  # kept from an interrupted push of this very file: where a push resumes
    held: ModelFile | None  # a file with this sha256 and size, already in the models dir
    free_bytes: int


@dataclass(frozen=True)
class Received:
    model: ModelFile
    received_bytes: int
    already_held: bool
    seconds: float


@dataclass(frozen=True)
class Target:
    final: Path
    partial: Path
    record: Path

    @classmethod
    def of(cls, root: Path, name: str) -> Target:
        folder, _, stem = name.rpartition("/")
        directory = root / folder if folder else root
        return cls(directory / f"{stem}.gguf", directory / f".{stem}.gguf.partial",
                   directory / f".{stem}.gguf.partial.json")


def free_space(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system of `path`."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _read_record(path: Path) -> tuple[str, int] | None:
    try:
        document = json.loads(path.read_text())
        if document.get("version") != RECORD_VERSION:
            return None
        return str(document["sha256"]), int(document["size_bytes"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        # A damaged record costs a fresh start, never a wrong resume.
        return None


def kept_bytes(target: Target, offer: Offer, fd: int | None = None) -> int:
    """How many bytes of exactly this file an interrupted push left (0: none, or of another file);
    `fd`: the partial, open (and locked) already."""
    if _read_record(target.record) != (offer.sha256, offer.size_bytes):
        return 0
    try:
        size = os.fstat(fd).st_size if fd is not None else os.lstat(target.partial).st_size
    except FileNotFoundError:
        return 0
    return size if size <= offer.size_bytes else 0


def _lock(fd: int, target: Target) -> None:
    """Hold the partial for this push: another agent writing into a models dir shared with this
    one (an NFS mount) is refused instead of interleaving its bytes with ours."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise PushBusy(f"another process is writing {target.partial} (a models dir shared with another "
                           "node?): pull again once it is done") from None
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            # A file system without locks: pushes from one agent are still one at a time.
            log.warning("cannot lock %s (%s): two nodes pulling into one shared models dir would collide",
                        target.partial, exc.strerror)
            return
        raise


class _Partial:
    """The open partial file and the sha256 of what it holds so far (used from one thread at a time)."""

    def __init__(self, target: Target, fd: int, digest: Any, written: int) -> None:
        self.target = target
        self.fd = fd
        self.digest = digest
        self.written = written

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        self.written += len(view)

    def close(self) -> None:
        """Keep what arrived (for a resume): on disk, then closed. Safe to call twice."""
        if self.fd < 0:
            return
        try:
            os.fsync(self.fd)
        except OSError as exc:
            log.warning("cannot sync %s: %s", self.target.partial, exc)
        finally:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        """Delete what arrived and its record (while still holding the lock), then close."""
        self.target.partial.unlink(missing_ok=True)
        self.target.record.unlink(missing_ok=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def finish(self) -> FileKey:
        """Put the complete, verified file in place as NAME.gguf (durably, still holding the lock); its key."""
        os.fsync(self.fd)
        if os.path.lexists(self.target.final):
            raise NameTaken(f"{self.target.final} appeared while the file arrived: not overwritten")
        os.replace(self.target.partial, self.target.final)
        _sync_dir(self.target.final.parent)
        self.target.record.unlink(missing_ok=True)
        key = FileKey.of(self.target.final)
        os.close(self.fd)
        self.fd = -1
        return key


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def _write_record(target: Target, offer: Offer) -> None:
    temporary = target.record.with_name(f"{target.record.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"version": RECORD_VERSION, "sha256": offer.sha256,
                                     "size_bytes": offer.size_bytes}))
    os.replace(temporary, target.record)


def _hash_prefix(fd: int, size: int, stops: tuple[threading.Event, ...]) -> Any:
    digest = hashlib.sha256()
    done = 0
    while done < size:
        if any(stop.is_set() for stop in stops):
            raise PushStopped("the agent is stopping")
        chunk = os.pread(fd, min(HASH_CHUNK_BYTES, size - done), done)
        if not chunk:
            raise OSError(errno.EIO, f"the partial file ended {size - done} bytes early")
        digest.update(chunk)
        done += len(chunk)
    return digest


async def _in_thread(function: Callable[..., T], *args: Any, stop: threading.Event | None = None) -> T:
    """Run `function` in a thread. Cancelled, the caller still waits for the thread to end (it
    holds the file descriptor), telling it to stop early through `stop` when given."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        with contextlib.suppress(Exception):
            # Its outcome no longer matters (the push is cancelled); its end does.
            await work
        raise


def _os_failure(name: str, directory: Path, exc: OSError) -> LlamafleetError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NotEnoughSpace(f"the disk of {directory} filled up while {name} arrived: what arrived is kept; "
                              "free some space and pull again to resume")
    return PushRefused(f"cannot write {name} into {directory}: {exc.strerror or exc}")


class Receiver:
    """Takes pushed model files into the index's directory (see the module doc)."""

    def __init__(self, index: ModelIndex, free: Callable[[Path], int] = free_space,
                 idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self.index = index
        self._free = free
        self._idle_timeout_s = idle_timeout_s
        self._active: set[str] = set()  # names being received
        self._stop = threading.Event()

    def stop(self) -> None:
        """Tell a thread hashing a kept prefix to give up (the agent is stopping)."""
        self._stop.set()

    async def prepare(self, offer: Offer) -> Prepared:
        offer.check()
        target = Target.of(self.index.root, offer.name)
        held = await self._held(offer)
        if held is not None:
            return Prepared(0, held, await asyncio.to_thread(self._free_at, target))
        have, free = await asyncio.to_thread(self._inspect, target, offer)
        self._check_room(offer, target, have, free)
        return Prepared(have, None, free)

    async def begin(self, offer: Offer, offset: int) -> Push | Received:
        """Open the push of `offer` at `offset`: a Push to fill, or the file held already (nothing to
        receive). Every refusal happens here, before the caller sends a byte."""
        offer.check()
        if offer.name in self._active:
            raise PushBusy(f"a pull of {offer.name} into this agent is already under way")
        self._active.add(offer.name)
        target = Target.of(self.index.root, offer.name)
        push: Push | None = None
        try:
            held = await self._held(offer)
            if held is not None:
                return Received(held, 0, True, 0.0)
            stop = threading.Event()
            partial = await _in_thread(self._open, target, offer, offset, stop, stop=stop)
            push = Push(self, offer, offset, target, partial)
            return push
        except OSError as exc:
            raise _os_failure(offer.name, target.final.parent, exc) from None
        finally:
            if push is None:
                self._active.discard(offer.name)

    async def receive(self, offer: Offer, offset: int, chunks: AsyncIterable[bytes]) -> Received:
        """`begin`, then the push's `receive`: for a caller that answers nothing in between."""
        push = await self.begin(offer, offset)
        return push if isinstance(push, Received) else await push.receive(chunks)

    def _ended(self, name: str) -> None:
        self._active.discard(name)

    async def _fill(self, partial: _Partial, offer: Offer, chunks: AsyncIterable[bytes]) -> None:
        stream = aiter(chunks)
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), self._idle_timeout_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise PushInterrupted(f"no data for {self._idle_timeout_s:.0f} s: {partial.written} of "
                                      f"{offer.size_bytes} bytes of {offer.name} are kept for a resume") from None
            if partial.written + len(chunk) > offer.size_bytes:
                await _in_thread(partial.discard)
                raise UsageError(f"more than the {offer.size_bytes} bytes announced for {offer.name}: "
                                 "nothing was kept")
            if chunk:
                await _in_thread(partial.write, chunk)
        if partial.written < offer.size_bytes:
            raise PushInterrupted(f"the stream ended after {partial.written} of {offer.size_bytes} bytes of "
                                  f"{offer.name}: they are kept for a resume")

    async def _held(self, offer: Offer) -> ModelFile | None:
        for model in self.index.files:
            if model.state == "ready" and model.sha256 == offer.sha256 and model.size_bytes == offer.size_bytes:
                if await asyncio.to_thread(_unchanged, model):
                    return model
        return None

    def _free_at(self, target: Target) -> int:
        directory = target.final.parent
        return self._free(directory if directory.is_dir() else self.index.root)

    def _check_final(self, target: Target) -> None:
        if not os.path.lexists(target.final):
            return
        listed = next((m for m in self.index.files if m.path == str(target.final)), None)
        if listed is not None and listed.state == "ready":
            raise NameTaken(f"{target.final} already holds another file (sha256 {listed.sha256[:12]}…): remove it "
                            "or pull under another name")
        why = f"cannot be read ({listed.error})" if listed is not None and listed.error else "is not hashed yet"
        raise PushRefused(f"{target.final} exists and {why}: try again once the agent lists it ready")

    def _inspect(self, target: Target, offer: Offer) -> tuple[int, int]:
        self._check_final(target)
        return kept_bytes(target, offer), self._free_at(target)

    def _check_room(self, offer: Offer, target: Target, have: int, free: int) -> None:
        need = offer.size_bytes - have
        if need > free:
            more = f" more ({format_size(have)} kept)" if have else ""
            raise NotEnoughSpace(f"not enough disk space for {offer.name} in {target.final.parent}: needs "
                                 f"{format_size(need)}{more}, {format_size(free)} free")

    def _open(self, target: Target, offer: Offer, offset: int, stop: threading.Event) -> _Partial:
        """The partial file, open at `offset` with the sha256 of the bytes before it (blocking)."""
        self._check_final(target)
        have = kept_bytes(target, offer)
        if offset > have:
            raise PushRefused(f"cannot resume {offer.name} at byte {offset}: this agent keeps {have} bytes of it "
                              "(ask PrepareModelPush again)")
        self._check_room(offer, target, offset, self._free_at(target))
        target.final.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            _lock(fd, target)
            # Under the lock, again: another writer may have changed it since the look above.
            if offset > kept_bytes(target, offer, fd):
                raise PushRefused(f"cannot resume {offer.name} at byte {offset}: its kept bytes changed meanwhile "
                                  "(ask PrepareModelPush again)")
            os.ftruncate(fd, offset)
            if offset == 0:
                # The old bytes go before the record names the new file: never a record over another's bytes.
                _write_record(target, offer)
                digest = hashlib.sha256()
            else:
                digest = _hash_prefix(fd, offset, (self._stop, stop))
            os.lseek(fd, offset, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return _Partial(target, fd, digest, offset)


class Push:
    """One file being received: open (and locked) at its offset until `receive` or `end`."""

    def __init__(self, receiver: Receiver, offer: Offer, offset: int, target: Target, partial: _Partial) -> None:
        self.offer = offer
        self.offset = offset
        self._receiver = receiver
        self._target = target
        self._partial = partial
        self._started = time.monotonic()
        self._open = True

    async def receive(self, chunks: AsyncIterable[bytes]) -> Received:
        """Write `chunks` (the file from the offset on), verify the whole file, put it in place and
        list it READY. Ends the push whatever happens: what arrived is kept unless it is wrong."""
        offer, partial = self.offer, self._partial
        try:
            await self._receiver._fill(partial, offer, chunks)
            digest = partial.digest.hexdigest()
            if digest != offer.sha256:
                await _in_thread(partial.discard)
                raise DigestMismatch(f"{offer.name}: the bytes received have sha256 {digest[:12]}…, not "
                                     f"{offer.sha256[:12]}… as announced: nothing was kept")
            model = await self._receiver.index.adopt(offer.name, offer.sha256, partial.finish)
        except OSError as exc:
            raise _os_failure(offer.name, self._target.final.parent, exc) from None
        finally:
            await self.end()
        seconds = time.monotonic() - self._started
        log.info("received %s (%s%s) in %.1f s: sha256 %s… verified, listed as %s", offer.name,
                 format_size(offer.size_bytes), f", resumed at byte {self.offset}" if self.offset else "", seconds,
                 offer.sha256[:12], model.path)
        return Received(model, offer.size_bytes - self.offset, False, seconds)

    async def end(self) -> None:
        """Keep what arrived (synced, closed, unlocked) and free the name for the next push. Idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            await _in_thread(self._partial.close)
        finally:
            self._receiver._ended(self.offer.name)


def _unchanged(model: ModelFile) -> bool:
    try:
        return FileKey.of(Path(model.path)) == model.key
    except OSError:
        return False
