"""Cache hygiene for the rpc-servers' tensor cache: every entry checked, the size capped.

Stock llama.cpp trusts every file in `CACHE/rpc`: `set_tensor_hash` serves whatever bytes a file
of the asked name holds (it only checks that they fit the tensor), and an rpc-server writes the
entries it receives from the network in place with a plain write, so a crash mid-write leaves a
truncated entry that the next load serves as the tensor. Nothing ever removes an entry either.

An entry can be checked on its own: its name IS the 64-bit FNV-1a of its content. So:
- **verify**: an entry whose content does not hash to its name is removed (a staging writes it
  again; else the next load sends its bytes). The (size, mtime_ns) of every verified entry is
  kept in STATE/rpc-cache.json: an entry is hashed once per version. Hidden files (`.stage-*`,
  a staging's temp file) are not entries; an entry changed in the last RECENT_S seconds is being
  written (an rpc-server writes in place) and is left for a later pass.
- **cap**: past the cap, whole models are evicted, least recently used first, never one that a
  running coordinator uses; then entries no staged model names (written by an rpc-server from
  the network), oldest first. Those go last because they are the dear ones: a staged model's
  entries are written again from the local GGUF, the others only by sending their bytes again.

The state file also records the entries of each staged model (by sha256), when it was last
staged or in use, and per rpc-server slot the model last staged for it with that rpc-server's
generation and process (pid, start time): the model is in use while that process serves. The
daemon's keeper (agent/cache_keeper.py), every staging and `llamafleet-agent cache gc` change it
only under an exclusive lock on STATE/rpc-cache.lock (a staging holds it throughout, so nothing
is evicted or half-counted under it), in one process or several. All of it is blocking file
work: the daemon runs it in threads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from llamafleet.common.digests import HashCancelled
from llamafleet.common.fnv import Fnv1a, hash_range

log = logging.getLogger(__name__)
STATE_FILE = "rpc-cache.json"
LOCK_FILE = "rpc-cache.lock"
STATE_VERSION = 1
# An entry written this recently may still be being written (rpc-server writes in place).
RECENT_S = 10.0
DEFAULT_CAP_FRACTION = 0.5
CHUNK_BYTES = 16 * 1024 * 1024
# Verification results are written to the state file at least this often (a pass may take hours).
COMMIT_S = 5.0
ENTRY = re.compile(r"^[0-9a-f]{16}$")
TEMP_PREFIX = ".stage-"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CacheWorkStopped(Exception):
    """The agent is stopping: a verification gives up between chunks."""


@dataclass(frozen=True)
class Entry:
    name: str
    size: int
    mtime_ns: int


@dataclass
class ModelUse:
    name: str  # the model store's name for it, for people
    entries: dict[str, int]  # entry name → size when staged
    last_used_unix_ms: int


@dataclass(frozen=True)
class SlotUse:
    """The model last staged for one rpc-server slot, and the process that serves it."""

    sha256: str
    generation: int
    pid: int
    started_unix_ms: int  # the process's start: a reused pid is another process


SlotAlive = Callable[[int, SlotUse], bool]


@dataclass
class CacheState:
    verified: dict[str, tuple[int, int]] = field(default_factory=dict)  # name → (size, mtime_ns)
    models: dict[str, ModelUse] = field(default_factory=dict)  # by sha256
    slots: dict[int, SlotUse] = field(default_factory=dict)
    corrupt_removed: int = 0
    evictions: int = 0
    evicted_bytes: int = 0

    def in_use(self, alive: SlotAlive) -> set[str]:
        return {use.sha256 for index, use in self.slots.items() if alive(index, use)}

    def record_stage(self, sha256: str, name: str, entries: Mapping[str, int], now_ms: int,
                     uses: Mapping[int, SlotUse | None] | None = None) -> None:
        """A staging of `sha256` wrote or found `entries`; it is now the model of every rpc-server
        in `uses` (index → the process serving it; None: that rpc-server was not running, so no
        coordinator can be using it through it). Several with the per-device layout: one per GPU."""
        self.models[sha256] = ModelUse(name, dict(entries), now_ms)
        for slot, use in (uses or {}).items():
            if use is None:
                self.slots.pop(slot, None)
            else:
                self.slots[slot] = use

    def forget_missing(self, entries: Mapping[str, Entry]) -> None:
        """Drop what no longer matches the directory: changed entries' checks, models with no entry left."""
        self.verified = {n: v for n, v in self.verified.items()
                         if n in entries and v == (entries[n].size, entries[n].mtime_ns)}
        self.models = {sha: m for sha, m in self.models.items() if any(n in entries for n in m.entries)}

    def is_verified(self, entry: Entry) -> bool:
        return self.verified.get(entry.name) == (entry.size, entry.mtime_ns)


@dataclass(frozen=True)
class Removal:
    entry: Entry
    why: str
    model: str = ""  # sha256 of the evicted model; "" for an entry no model names


@dataclass(frozen=True)
class CacheSummary:
    cache_dir: str
    used_bytes: int = 0
    max_bytes: int = 0  # 0: no cap
    entries: int = 0
    models: int = 0
    in_use_bytes: int = 0
    unverified: int = 0
    corrupt_removed: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    checked_at_unix_ms: int = 0
    error: str = ""


@dataclass(frozen=True)
class GcReport:
    removed: tuple[Removal, ...]
    over_cap_bytes: int  # still over the cap: in use, or being written
    summary: CacheSummary


# ---- the cap ---------------------------------------------------------------------------------


def default_cap(cache_dir: Path) -> int:
    """DEFAULT_CAP_FRACTION of the filesystem the cache lives on (the nearest existing folder's)."""
    probe = cache_dir.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    fs = os.statvfs(probe)
    return int(fs.f_blocks * fs.f_frsize * DEFAULT_CAP_FRACTION)


def effective_cap(setting: int | None, cache_dir: Path) -> int:
    """The cap in bytes: the setting's, or the default for None; 0 means none."""
    return default_cap(cache_dir) if setting is None else setting


# ---- whose entries are in use ------------------------------------------------------------------


def process_started_ms(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except psutil.NoSuchProcess:
        return None


def process_alive(index: int, use: SlotUse) -> bool:
    """Without the daemon's supervisors (the CLI): does that rpc-server process still run?"""
    try:
        started = int(psutil.Process(use.pid).create_time() * 1000)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # cannot tell: keep its model
    return abs(started - use.started_unix_ms) < 1000


# ---- entries -------------------------------------------------------------------------------


def scan(cache_dir: Path) -> dict[str, Entry]:
    """The entries (regular files named by 16 hex digits) in the cache dir; none when it is missing."""
    out: dict[str, Entry] = {}
    try:
        listing = list(os.scandir(cache_dir))
    except FileNotFoundError:
        return out
    for item in listing:
        if not ENTRY.match(item.name):
            continue
        try:
            stat = item.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if item.is_file(follow_symlinks=False):
            out[item.name] = Entry(item.name, stat.st_size, stat.st_mtime_ns)
    return out


def _recent(entry: Entry, now_ns: int) -> bool:
    return now_ns - entry.mtime_ns < RECENT_S * 1e9


def check_entry(path: Path, fnv: Fnv1a, buffer: bytearray, stop: threading.Event) -> tuple[bool, os.stat_result] | None:
    """Whether the file's content hashes to its name, and the version of it that was read;
    None when it is gone or changed while it was read (being written: ask again later)."""
    expected = int(path.name, 16)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        before = os.fstat(fd)
        try:
            state = hash_range(fd, 0, before.st_size, fnv, buffer, stop)
        except HashCancelled:
            raise CacheWorkStopped from None
        except OSError:
            return None  # shorter than it was a moment ago: being rewritten
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return None
    return state == expected, before


REFERENCE_SUFFIX = ".ref"


def reference_problem(lines: list[str]) -> str:
    """Why a reference entry's lines no longer stand for its span ("" when they still do)."""
    try:
        magic, path, numbers = lines
        _, _, file_size, mtime_ns = (int(n) for n in numbers.split())
    except ValueError:
        return "malformed reference"
    if magic != "llama-rpc-ref 1":
        return "malformed reference"
    try:
        stat = os.stat(path)
    except OSError:
        return f"reference to {path}, which is gone"
    if (stat.st_size, stat.st_mtime_ns) != (file_size, mtime_ns):
        return f"reference to {path}, which changed since"
    return ""


def _unchanged(path: Path, size: int, mtime_ns: int, ino: int | None = None) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_size, now.st_mtime_ns) == (size, mtime_ns) and (ino is None or now.st_ino == ino)


def plan_eviction(entries: Mapping[str, Entry], models: Mapping[str, ModelUse], in_use: set[str], cap: int,
                  now_ns: int) -> tuple[list[Removal], list[str], int]:
    """What to remove to get under `cap`: removals, the evicted models' sha256s, and the bytes still over.

    Whole models, least recently used first, none in `in_use`; an entry another kept model names
    stays. Then entries no model names, oldest first. Never one being written (RECENT_S)."""
    used = sum(e.size for e in entries.values())
    if cap <= 0 or used <= cap:
        return [], [], 0
    keep = {n for sha in in_use if sha in models for n in models[sha].entries}
    keep |= {n for n, e in entries.items() if _recent(e, now_ns)}
    remaining = dict(models)
    removals: list[Removal] = []
    evicted: list[str] = []
    for sha, use in sorted(models.items(), key=lambda item: (item[1].last_used_unix_ms, item[0])):
        if used <= cap:
            break
        if sha in in_use:
            continue
        others = {n for other, u in remaining.items() if other != sha for n in u.entries}
        victims = [entries[n] for n in sorted(use.entries) if n in entries and n not in keep and n not in others]
        if not victims:
            continue
        del remaining[sha]
        evicted.append(sha)
        age = _age((now_ns // 1_000_000) - use.last_used_unix_ms)
        why = f"model {use.name} (sha256 {sha[:12]}…), the least recently used: last used {age} ago"
        removals += [Removal(e, why, sha) for e in victims]
        used -= sum(e.size for e in victims)
    owned = {n for u in remaining.values() for n in u.entries} | {r.entry.name for r in removals}
    unowned = sorted((e for n, e in entries.items() if n not in owned and n not in keep),
                     key=lambda e: (e.mtime_ns, e.name))
    for entry in unowned:
        if used <= cap:
            break
        removals.append(Removal(entry, "written by an rpc-server from the network (no model known), oldest first"))
        used -= entry.size
    return removals, evicted, max(0, used - cap)


def _age(ms: int) -> str:
    seconds = max(0, ms) / 1000
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# ---- the state file --------------------------------------------------------------------------


def _state_to_json(state: CacheState) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "verified": {n: list(v) for n, v in sorted(state.verified.items())},
        "models": {sha: asdict(m) for sha, m in sorted(state.models.items())},
        "slots": {str(i): asdict(u) for i, u in sorted(state.slots.items())},
        "corrupt_removed": state.corrupt_removed, "evictions": state.evictions, "evicted_bytes": state.evicted_bytes,
    }


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _state_from_json(doc: Any) -> CacheState:
    if doc.get("version") != STATE_VERSION:
        raise ValueError(f"version {doc.get('version')!r}, not {STATE_VERSION}")
    verified = {n: (_int(v[0]), _int(v[1])) for n, v in doc["verified"].items() if ENTRY.match(n)}
    models = {sha: ModelUse(str(m["name"]), {n: _int(s) for n, s in m["entries"].items() if ENTRY.match(n)},
                            _int(m["last_used_unix_ms"]))
              for sha, m in doc["models"].items() if _SHA256.match(sha)}
    slots = {int(i): SlotUse(str(u["sha256"]), _int(u["generation"]), _int(u["pid"]), _int(u["started_unix_ms"]))
             for i, u in doc["slots"].items()}
    return CacheState(verified, models, slots, _int(doc["corrupt_removed"]), _int(doc["evictions"]),
                      _int(doc["evicted_bytes"]))


class RpcCache:
    """One cache dir (CACHE/rpc) and its record in the state dir."""

    def __init__(self, cache_dir: Path, state_dir: Path, on_wait: Callable[[], None] = lambda: None) -> None:
        self.cache_dir = cache_dir
        self.state_path = state_dir / STATE_FILE
        self.lock_path = state_dir / LOCK_FILE
        self._on_wait = on_wait  # called once when the lock is held by another writer

    def read(self) -> CacheState:
        """The state as last saved (saves are atomic renames: no lock needed to read)."""
        try:
            return _state_from_json(json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return CacheState()
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            # Costs a rehash of every entry and the models' usage history, never a wrong answer.
            log.warning("ignoring the rpc cache record %s (%s): entries will be verified again", self.state_path, exc)
            return CacheState()

    def _save(self, state: CacheState) -> None:
        temporary = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(_state_to_json(state)))
        os.replace(temporary, self.state_path)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[CacheState]:
        """The state under the exclusive lock, saved when the block ends without an exception."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._on_wait()
                fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            yield state
            self._save(state)

    def summarize(self, cap: int, alive: SlotAlive, state: CacheState | None = None,
                  entries: Mapping[str, Entry] | None = None) -> CacheSummary:
        entries = scan(self.cache_dir) if entries is None else entries
        state = self.read() if state is None else state
        in_use = {n for sha in state.in_use(alive) if sha in state.models for n in state.models[sha].entries}
        return CacheSummary(
            cache_dir=str(self.cache_dir), used_bytes=sum(e.size for e in entries.values()), max_bytes=cap,
            entries=len(entries), models=sum(1 for m in state.models.values() if any(n in entries for n in m.entries)),
            in_use_bytes=sum(entries[n].size for n in in_use if n in entries),
            unverified=sum(1 for e in entries.values() if not state.is_verified(e)),
            corrupt_removed=state.corrupt_removed, evictions=state.evictions, evicted_bytes=state.evicted_bytes,
            checked_at_unix_ms=int(time.time() * 1000),
        )

    def enforce(self, cap: int, alive: SlotAlive, drop_dead_slots: bool = True) -> GcReport:
        """Get under `cap` (0: no cap), and remove a dead staging's temp files (none runs: we hold the lock).
        Says what it removed and why; the caller tells people.

        In-use models count as used now; with `drop_dead_slots`, a slot whose rpc-server moved on
        is forgotten."""
        now_ns = time.time_ns()
        with self.transaction() as state:
            self._remove_stale_temp_files(now_ns)
            entries = scan(self.cache_dir)
            state.forget_missing(entries)
            in_use = state.in_use(alive)
            for sha in in_use & state.models.keys():
                state.models[sha].last_used_unix_ms = now_ns // 1_000_000
            if drop_dead_slots:
                state.slots = {i: u for i, u in state.slots.items() if alive(i, u)}
            planned, evicted, over = plan_eviction(entries, state.models, in_use, cap, now_ns)
            removed = tuple(r for r in planned if self._remove(r.entry))
            for sha in evicted:
                state.models.pop(sha, None)
            state.evictions += len(removed)
            state.evicted_bytes += sum(r.entry.size for r in removed)
            entries = {n: e for n, e in entries.items() if n not in {r.entry.name for r in removed}}
            state.forget_missing(entries)
            summary = self.summarize(cap, alive, state, entries)
        return GcReport(removed, over, summary)

    def _remove(self, entry: Entry) -> bool:
        path = self.cache_dir / entry.name
        if not _unchanged(path, entry.size, entry.mtime_ns):
            return False  # written again meanwhile: not the version we chose
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True

    def _remove_stale_temp_files(self, now_ns: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            for item in os.scandir(self.cache_dir):
                if item.name.startswith(TEMP_PREFIX) and item.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        stat = item.stat(follow_symlinks=False)
                        if now_ns - stat.st_mtime_ns > RECENT_S * 1e9:
                            os.unlink(item.path)
                            log.info("removed %s, a temp file a stopped staging left in the rpc cache", item.name)

    def verify(self, fnv: Fnv1a, stop: threading.Event, everything: bool = False) -> tuple[Removal, ...]:
        """Hash the entries not verified yet (`everything`: all of them), remove the bad ones (returned).

        The hashing runs outside the lock (a staging may wait for it otherwise for as long as
        the pass takes); each result is applied only if the file is still the version read."""
        now_ns = time.time_ns()
        entries = scan(self.cache_dir)
        state = self.read()
        pending = sorted((e for e in entries.values()
                          if not _recent(e, now_ns) and (everything or not state.is_verified(e))), key=lambda e: e.name)
        removed: list[Removal] = []
        results: list[tuple[bool, os.stat_result, Entry]] = []
        buffer = bytearray(CHUNK_BYTES)
        last_commit = time.monotonic()
        for entry in pending:
            checked = check_entry(self.cache_dir / entry.name, fnv, buffer, stop)
            if checked is not None:
                results.append((*checked, entry))
            if time.monotonic() - last_commit > COMMIT_S:
                removed += self._commit(results)
                results, last_commit = [], time.monotonic()
        removed += self._commit(results)
        return tuple(removed + self._remove_stale_references(now_ns))

    def _remove_stale_references(self, now_ns: int) -> list[Removal]:
        """Reference entries (`<name>.ref`, agent/staging.py, read by rpc-servers with patch 0003) whose
        file went away or changed: the rpc-server would only miss on them, but they are clutter.
        They take no room (a few hundred bytes), so the cap never counts or evicts them."""
        removed = []
        for path in sorted(self.cache_dir.glob("*" + REFERENCE_SUFFIX)):
            try:
                stat = path.stat()
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            if now_ns - stat.st_mtime_ns < RECENT_S * 1e9:
                continue  # may be one a staging is writing now
            why = reference_problem(lines)
            if why:
                path.unlink(missing_ok=True)
                removed.append(Removal(Entry(path.name, stat.st_size, stat.st_mtime_ns), why))
        return removed

    def _commit(self, results: list[tuple[bool, os.stat_result, Entry]]) -> list[Removal]:
        if not results:
            return []
        removed: list[Removal] = []
        with self.transaction() as state:
            sizes = {n: s for m in state.models.values() for n, s in m.entries.items()}
            for intact, stat, entry in results:
                path = self.cache_dir / entry.name
                if not _unchanged(path, stat.st_size, stat.st_mtime_ns, stat.st_ino):
                    continue
                if intact:
                    state.verified[entry.name] = (stat.st_size, stat.st_mtime_ns)
                    continue
                expected = sizes.get(entry.name)
                truncated = expected is not None and stat.st_size < expected
                why = (f"truncated: {stat.st_size} of {expected} bytes" if truncated
                       else "corrupted: its content does not hash to its name")
                path.unlink(missing_ok=True)
                state.verified.pop(entry.name, None)
                state.corrupt_removed += 1
                removed.append(Removal(Entry(entry.name, stat.st_size, stat.st_mtime_ns), why))
        return removed

    def listing(self, cap: int, alive: SlotAlive) -> dict[str, Any]:
        """`cache ls --json`: the summary, the entries by model, and every entry (read only: no lock)."""
        entries = scan(self.cache_dir)
        state = self.read()
        in_use = state.in_use(alive)
        owners: dict[str, list[str]] = {}
        models = []
        for sha, use in sorted(state.models.items(), key=lambda item: -item[1].last_used_unix_ms):
            present = [entries[n] for n in use.entries if n in entries]
            if not present:
                continue
            for e in present:
                owners.setdefault(e.name, []).append(sha)
            models.append({
                "sha256": sha, "name": use.name, "entries": len(present), "missing": len(use.entries) - len(present),
                "size_bytes": sum(e.size for e in present), "last_used_unix_ms": use.last_used_unix_ms,
                "in_use": sha in in_use,
                "rpc_server_indexes": sorted(i for i, u in state.slots.items() if u.sha256 == sha and alive(i, u)),
                "verified": sum(1 for e in present if state.is_verified(e)),
            })
        unowned = [e for n, e in entries.items() if n not in owners]
        return {
            "summary": asdict(self.summarize(cap, alive, state, entries)),
            "models": models,
            "network": {"entries": len(unowned), "size_bytes": sum(e.size for e in unowned),
                        "verified": sum(1 for e in unowned if state.is_verified(e)),
                        "newest_unix_ms": max((e.mtime_ns // 1_000_000 for e in unowned), default=0)},
            "entries": [{"name": e.name, "size_bytes": e.size, "mtime_unix_ms": e.mtime_ns // 1_000_000,
                         "verified": state.is_verified(e), "models": owners.get(e.name, [])}
                        for e in sorted(entries.values(), key=lambda e: e.name)],
        }
