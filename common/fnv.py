"""64-bit FNV-1a, the key of llama.cpp's rpc tensor cache, at C speed.

FNV-1a is one xor and one multiply per byte, each depending on the last: in pure Python that is
well under 10 MB/s (a 170 MB tensor would take many seconds; a 40 GB share, an hour), slower
than sending the bytes over 1 GbE, which would make pre-staging pointless. So the agent (and the
controller, for the coordinator's pre-computed hashes) compiles a ten-line C function with the
system compiler on first use (every host that builds llama.cpp has one) into
STATE/fnv1a/<sha256 of the source>.so and calls it through ctypes, which releases the GIL for the
call: hashing runs in threads, in parallel, while the event loop keeps serving.

No compiler means no pre-staging and no pre-computed hashes (`FnvUnavailable`): the load then
sends the bytes, and the coordinator hashes them, as without these features. A slow Python
fallback would be the worse answer: it would delay every load by more than it saves.

The state carries over calls (FNV-1a continues from any previous state), so a file is hashed in
chunks without holding it in memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from llamafleet.common.digests import HashCancelled
from llamafleet.common.errors import LlamafleetError

log = logging.getLogger(__name__)
OFFSET_BASIS = 0xCBF29CE484222325
PRIME = 0x100000001B3
_MASK = (1 << 64) - 1
COMPILE_TIMEOUT_S = 60.0

# The same loop as llama.cpp's fnv_hash (ggml/src/ggml-rpc/ggml-rpc.cpp), with the state passed in.
C_SOURCE = """\
#include <stddef.h>
#include <stdint.h>
uint64_t llamafleet_fnv1a(const unsigned char *data, size_t len, uint64_t hash) {
    const uint64_t prime = 0x100000001b3ULL;
    for (size_t i = 0; i < len; ++i) {
        hash ^= data[i];
        hash *= prime;
    }
    return hash;
}
"""


class FnvUnavailable(LlamafleetError):
    """The C hash cannot be built or loaded here (no compiler, or it failed)."""


def fnv1a_python(data: bytes, state: int = OFFSET_BASIS) -> int:
    """The reference (slow): for tests and for tiny inputs."""
    for byte in data:
        state = ((state ^ byte) * PRIME) & _MASK
    return state


def _compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and (found := shutil.which(name)):
            return found
    return None


class Fnv1a:
    """The compiled hash, built once per source version under `lib_dir`."""

    def __init__(self, lib_dir: Path) -> None:
        self.lib_dir = lib_dir
        self._lock = threading.Lock()
        self._fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]

    @property
    def library_path(self) -> Path:
        digest = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:16]
        return self.lib_dir / f"fnv1a-{digest}.so"

    def _load(self) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
        """Compile if needed and load (blocking: call from a thread)."""
        with self._lock:
            if self._fn is not None:
                return self._fn
            path = self.library_path
            if not path.exists():
                self._compile(path)
            try:
                fn = ctypes.CDLL(str(path)).llamafleet_fnv1a
            except (OSError, AttributeError) as exc:
                raise FnvUnavailable(f"cannot load the FNV-1a library {path}: {exc}") from None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]
            fn.restype = ctypes.c_uint64
            self._fn = fn
            return fn

    def _compile(self, path: Path) -> None:
        cc = _compiler()
        if cc is None:
            raise FnvUnavailable("no C compiler (cc, gcc or clang; or $CC) on this worker to build the FNV-1a "
                                 "hash that pre-staging needs: install one; loads send the weights meanwhile")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
            source = Path(tmp) / "fnv1a.c"
            source.write_text(C_SOURCE)
            built = Path(tmp) / "fnv1a.so"
            try:
                result = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(source)],
                                        capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise FnvUnavailable(f"cannot run {cc} to build the FNV-1a hash: {exc}") from None
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise FnvUnavailable(f"{cc} failed to build the FNV-1a hash: {last}")
            # Renamed into place: an agent that dies mid-compile leaves no half library behind.
            os.replace(built, path)
        log.info("built the FNV-1a hash with %s: %s", cc, path)

    def ensure(self) -> None:
        """Build and load now (blocking), raising FnvUnavailable with the cause."""
        self._load()

    def update(self, buffer: bytearray | memoryview, length: int, state: int = OFFSET_BASIS) -> int:
        """Continue `state` over the first `length` bytes of a writable buffer (blocking; no copy)."""
        fn = self._load()
        if length == 0:
            return state
        view = memoryview(buffer)
        if length > view.nbytes:
            raise ValueError(f"length {length} is beyond the buffer's {view.nbytes} bytes")
        pointer = ctypes.addressof(ctypes.c_char.from_buffer(view))
        return int(fn(pointer, length, state))

    def hash(self, data: bytes, state: int = OFFSET_BASIS) -> int:
        """One buffer at once (copies it: for tests and small inputs)."""
        return self.update(bytearray(data), len(data), state)


def entry_name(value: int) -> str:
    """The cache file name llama.cpp uses: `%016" PRIx64`."""
    return f"{value:016x}"


def read_chunks(fd: int, offset: int, size: int, buffer: bytearray, stop: threading.Event) -> Iterator[int]:
    """Read `size` bytes at `offset` into `buffer` a chunk at a time; yields how many bytes of it are
    filled. Raises HashCancelled between chunks once `stop` is set, OSError if the file ends early."""
    view = memoryview(buffer)
    done = 0
    while done < size:
        if stop.is_set():
            raise HashCancelled(f"offset {offset}")
        want = min(len(buffer), size - done)
        got = os.preadv(fd, [view[:want]], offset + done)
        if got <= 0:
            raise OSError(f"the file ended {size - done} bytes early at offset {offset + done}")
        yield got
        done += got


def hash_range(fd: int, offset: int, size: int, fnv: Fnv1a, buffer: bytearray, stop: threading.Event) -> int:
    """The FNV-1a of `size` bytes of an open file at `offset`, as llama.cpp computes a tensor's."""
    state = OFFSET_BASIS
    for got in read_chunks(fd, offset, size, buffer, stop):
        state = fnv.update(buffer, got, state)
    return state
