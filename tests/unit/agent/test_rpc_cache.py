"""Cache hygiene on real files: bad entries are found and removed, the cap evicts the least
recently used model, never one in use, and entries from the network after models' entries."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from llamafleet.agent import rpc_cache as rpc_cache_module
from llamafleet.common.fnv import Fnv1a, entry_name
from llamafleet.agent.models import ModelFile
from llamafleet.agent.rpc_cache import (
    CacheState,
    Entry,
    ModelUse,
    RpcCache,
    SlotUse,
    plan_eviction,
    process_alive,
    scan,
)
from llamafleet.agent.staging import ByteRange, stage
from llamafleet.common.digests import FileKey

HOUR_NS = 3600 * 10**9
SHA_A, SHA_B, SHA_C = "aa" * 32, "bb" * 32, "cc" * 32


@pytest.fixture(scope="module")
def fnv(tmp_path_factory: pytest.TempPathFactory) -> Fnv1a:
    return Fnv1a(tmp_path_factory.mktemp("fnv"))


@pytest.fixture
def cache(tmp_path: Path) -> RpcCache:
    (tmp_path / "cache" / "rpc").mkdir(parents=True)
    return RpcCache(tmp_path / "cache" / "rpc", tmp_path / "state")


def write_entry(cache: RpcCache, fnv: Fnv1a, data: bytes, age_s: float = 3600.0) -> Path:
    """An entry as rpc-server or a staging writes it: named by the FNV-1a of its bytes, `age_s` old."""
    path = cache.cache_dir / entry_name(fnv.hash(data))
    path.write_bytes(data)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def never(index: int, use: SlotUse) -> bool:
    return False


def test_a_flipped_byte_and_a_truncation_are_found_and_removed(cache: RpcCache, fnv: Fnv1a) -> None:
    good = write_entry(cache, fnv, os.urandom(3000))
    flipped = write_entry(cache, fnv, os.urandom(3000))
    truncated = write_entry(cache, fnv, os.urandom(3000))
    with cache.transaction() as state:  # a staging recorded the truncated one's size
        state.record_stage(SHA_A, "m", {truncated.name: 3000}, 0)
    data = bytearray(flipped.read_bytes())
    data[1234] ^= 0x01
    flipped.write_bytes(bytes(data))
    with truncated.open("r+b") as handle:
        handle.truncate(1000)
    for path in (flipped, truncated):
        os.utime(path, (time.time() - 60, time.time() - 60))  # not being written any more

    removed = cache.verify(fnv, threading.Event())

    why = {r.entry.name: r.why for r in removed}
    assert why == {flipped.name: "corrupted: its content does not hash to its name",
                   truncated.name: "truncated: 1000 of 3000 bytes"}
    assert sorted(scan(cache.cache_dir)) == [good.name]
    state = cache.read()
    assert state.corrupt_removed == 2 and list(state.verified) == [good.name]
    assert cache.summarize(0, never).unverified == 0


def test_a_verified_entry_is_hashed_once_per_version(cache: RpcCache, fnv: Fnv1a,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    entry = write_entry(cache, fnv, os.urandom(2000))
    assert cache.verify(fnv, threading.Event()) == ()
    checked: list[str] = []
    real = rpc_cache_module.check_entry

    def counted(path: Path, *args: Any) -> Any:
        checked.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(rpc_cache_module, "check_entry", counted)
    cache.verify(fnv, threading.Event())
    assert checked == []  # same size and mtime: not read again
    cache.verify(fnv, threading.Event(), everything=True)
    assert checked == [entry.name]
    os.utime(entry, (time.time() - 30, time.time() - 30))  # a new version (same bytes)
    cache.verify(fnv, threading.Event())
    assert checked == [entry.name, entry.name]


def test_entries_being_written_and_temp_files_are_left_alone(cache: RpcCache, fnv: Fnv1a) -> None:
    # rpc-server writes an entry from the network in place: half of it, for now.
    writing = cache.cache_dir / entry_name(fnv.hash(b"x" * 5000))
    writing.write_bytes(b"x" * 2500)
    temp = cache.cache_dir / f".stage-{writing.name}-abc"
    temp.write_bytes(b"half")
    assert cache.verify(fnv, threading.Event(), everything=True) == ()
    assert writing.exists() and temp.exists()
    assert list(scan(cache.cache_dir)) == [writing.name]  # a temp file is no entry


def test_a_stopped_stagings_temp_file_goes_when_no_staging_runs(cache: RpcCache) -> None:
    old = cache.cache_dir / ".stage-0123456789abcdef-x1"
    new = cache.cache_dir / ".stage-0123456789abcdef-x2"
    old.write_bytes(b"left by a SIGKILLed agent")
    new.write_bytes(b"a staging writing now")
    os.utime(old, (time.time() - 600, time.time() - 600))
    cache.enforce(0, never)
    assert not old.exists() and new.exists()


def entries_of(*sizes_and_ages: tuple[str, int, float]) -> dict[str, Entry]:
    now = time.time_ns()
    return {name: Entry(name, size, now - int(age_h * HOUR_NS)) for name, size, age_h in sizes_and_ages}


def names(count: int, prefix: str) -> list[str]:
    return [f"{prefix}{i:015x}" for i in range(count)]


def test_the_cap_evicts_the_least_recently_used_model_and_never_one_in_use() -> None:
    a, b, c = names(2, "a"), names(2, "b"), names(2, "c")
    entries = entries_of(*[(n, 100, 5) for n in a + b + c])
    models = {SHA_A: ModelUse("oldest", dict.fromkeys(a, 100), 1_000),
              SHA_B: ModelUse("in-use", dict.fromkeys(b, 100), 500),  # older still, but in use
              SHA_C: ModelUse("newest", dict.fromkeys(c, 100), 9_000)}
    removals, evicted, over = plan_eviction(entries, models, {SHA_B}, 450, time.time_ns())
    assert evicted == [SHA_A] and sorted(r.entry.name for r in removals) == a and over == 0
    assert all("model oldest" in r.why and "least recently used" in r.why for r in removals)

    # Over the cap by more than the idle models hold: everything idle goes, the in-use one stays.
    removals, evicted, over = plan_eviction(entries, models, {SHA_B}, 100, time.time_ns())
    assert evicted == [SHA_A, SHA_C] and over == 100
    assert not {r.entry.name for r in removals} & set(b)


def test_entries_from_the_network_go_after_models_oldest_first() -> None:
    a = names(1, "a")
    entries = entries_of((a[0], 100, 1), ("e00000000000000a", 100, 48), ("e00000000000000b", 100, 24),
                         ("e00000000000000c", 100, 2))
    models = {SHA_A: ModelUse("m", dict.fromkeys(a, 100), 0)}
    removals, evicted, _ = plan_eviction(entries, models, set(), 150, time.time_ns())
    # The model first, though its entry is the newest file; then the oldest network entries.
    assert [r.entry.name for r in removals] == [a[0], "e00000000000000a", "e00000000000000b"]
    assert evicted == [SHA_A] and "from the network" in removals[1].why


def test_an_entry_two_models_share_stays_while_either_is_kept() -> None:
    shared, own = "5" * 16, "6" * 16
    entries = entries_of((shared, 100, 1), (own, 100, 1), ("7" * 16, 100, 1))
    models = {SHA_A: ModelUse("old", {shared: 100, own: 100}, 0), SHA_B: ModelUse("new", {shared: 100}, 10),
              SHA_C: ModelUse("other", {"7" * 16: 100}, 20)}
    removals, evicted, _ = plan_eviction(entries, models, {SHA_B}, 250, time.time_ns())
    assert [r.entry.name for r in removals] == [own] and evicted == [SHA_A]


def test_under_the_cap_or_without_one_nothing_goes() -> None:
    entries = entries_of(("1" * 16, 100, 1))
    assert plan_eviction(entries, {}, set(), 100, time.time_ns()) == ([], [], 0)
    assert plan_eviction(entries, {}, set(), 0, time.time_ns()) == ([], [], 0)


def test_enforce_removes_the_files_counts_them_and_forgets_the_model(cache: RpcCache, fnv: Fnv1a) -> None:
    old = [write_entry(cache, fnv, os.urandom(1000)) for _ in range(2)]
    kept = write_entry(cache, fnv, os.urandom(1000))
    network = write_entry(cache, fnv, os.urandom(1000), age_s=7200)
    with cache.transaction() as state:
        state.record_stage(SHA_A, "old", {p.name: 1000 for p in old}, 1_000)
        state.record_stage(SHA_B, "kept", {kept.name: 1000}, 2_000)
    report = cache.enforce(2000, never)
    assert sorted(r.entry.name for r in report.removed) == sorted(p.name for p in old)
    assert sorted(scan(cache.cache_dir)) == sorted([kept.name, network.name])
    state = cache.read()
    assert list(state.models) == [SHA_B] and state.evictions == 2 and state.evicted_bytes == 2000
    assert report.summary.used_bytes == 2000 and report.summary.evictions == 2 and report.over_cap_bytes == 0


def test_a_model_in_use_by_a_running_process_is_kept_by_the_command_line_check(cache: RpcCache, fnv: Fnv1a) -> None:
    me = psutil.Process()
    started = int(me.create_time() * 1000)
    entry = write_entry(cache, fnv, os.urandom(1000))
    with cache.transaction() as state:
        state.record_stage(SHA_A, "served", {entry.name: 1000}, 0, uses={1: SlotUse(SHA_A, 3, me.pid, started)})
    assert process_alive(1, SlotUse(SHA_A, 3, me.pid, started))
    assert not process_alive(1, SlotUse(SHA_A, 3, me.pid, started - 60_000))  # the pid, reused later
    report = cache.enforce(1, process_alive)
    assert report.removed == () and report.over_cap_bytes == 999 and entry.exists()
    assert report.summary.in_use_bytes == 1000


def test_a_slot_staged_again_frees_the_model_it_served(cache: RpcCache, fnv: Fnv1a) -> None:
    first, second = write_entry(cache, fnv, os.urandom(1000)), write_entry(cache, fnv, os.urandom(1000))
    with cache.transaction() as state:
        state.record_stage(SHA_A, "first", {first.name: 1000}, 0, uses={0: SlotUse(SHA_A, 1, 10, 0)})
        state.record_stage(SHA_B, "second", {second.name: 1000}, 5, uses={0: SlotUse(SHA_B, 1, 10, 0)})
    report = cache.enforce(1000, lambda index, use: True)
    assert [r.entry.name for r in report.removed] == [first.name]


def test_a_model_staged_for_every_rpc_server_of_a_per_device_slot_is_kept_while_any_serves(
        cache: RpcCache, fnv: Fnv1a) -> None:
    # --rpc-layout per-device: slot 0 is rpc-servers #0 and #1, one per GPU. Model B was staged
    # for #0 alone before; model A now for both.
    a, b = write_entry(cache, fnv, os.urandom(1000)), write_entry(cache, fnv, os.urandom(1000))
    with cache.transaction() as state:
        state.record_stage(SHA_B, "b", {b.name: 1000}, 0, uses={0: SlotUse(SHA_B, 1, 10, 0)})
        state.record_stage(SHA_A, "a", {a.name: 1000}, 5, uses={0: SlotUse(SHA_A, 1, 10, 0), 1: SlotUse(SHA_A, 1, 11, 0)})
        assert state.in_use(lambda index, use: True) == {SHA_A}  # #0 moved on from B
    # #1 restarted (its generation changed): A is still served through #0, and stays.
    report = cache.enforce(1000, lambda index, use: index == 0)
    assert [r.entry.name for r in report.removed] == [b.name] and a.exists()
    # A rpc-server that was not running when staged holds nothing: only the running one protects.
    with cache.transaction() as state:
        state.record_stage(SHA_B, "b", {}, 9, uses={0: None, 1: SlotUse(SHA_B, 2, 12, 0)})
        assert 0 not in state.slots and state.in_use(lambda index, use: True) == {SHA_B}


def test_the_record_survives_a_restart_and_a_damaged_one_is_ignored(cache: RpcCache,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with cache.transaction() as state:
        state.record_stage(SHA_A, "m", {"1" * 16: 5}, 7, uses={2: SlotUse(SHA_A, 4, 99, 123)})
        state.verified["1" * 16] = (5, 6)
        state.corrupt_removed = 3
    again = cache.read()
    assert again == CacheState({"1" * 16: (5, 6)}, {SHA_A: ModelUse("m", {"1" * 16: 5}, 7)},
                               {2: SlotUse(SHA_A, 4, 99, 123)}, 3)
    cache.state_path.write_text(json.dumps({"version": 1, "verified": [], "models": "x"}))
    assert cache.read() == CacheState()
    assert "ignoring the rpc cache record" in caplog.text


def test_a_second_writer_waits_for_the_lock(tmp_path: Path) -> None:
    waited = threading.Event()
    first = RpcCache(tmp_path / "rpc", tmp_path / "state")
    second = RpcCache(tmp_path / "rpc", tmp_path / "state", on_wait=waited.set)
    order: list[str] = []
    with first.transaction() as state:
        state.corrupt_removed = 1

        def take() -> None:
            with second.transaction() as seen:
                order.append(f"second saw {seen.corrupt_removed}")

        worker = threading.Thread(target=take)
        worker.start()
        assert waited.wait(5)
        order.append("first")
    worker.join(5)
    assert order == ["first", "second saw 1"]


# ---- staging verifies what it finds --------------------------------------------------------


def model_file(path: Path, data: bytes) -> ModelFile:
    path.write_bytes(data)
    key = FileKey.of(path)
    return ModelFile(path.stem, str(path), key.size, key.mtime_ns, SHA_A, "ready")


def test_staging_rewrites_a_corrupted_entry_of_the_right_size(tmp_path: Path, fnv: Fnv1a) -> None:
    data = os.urandom(3000)
    model = model_file(tmp_path / "m.gguf", data)
    ranges = [ByteRange(0, 1500), ByteRange(1500, 1500)]
    cache = tmp_path / "rpc"
    verified: dict[str, tuple[int, int]] = {}
    first = stage(model, ranges, cache, fnv, threshold=100, verified=verified)
    assert sorted(verified) == sorted(first.entries)  # what it wrote counts as verified
    good, bad = (cache / name for name in first.entries)
    flipped = bytearray(bad.read_bytes())
    flipped[700] ^= 0x80
    bad.write_bytes(bytes(flipped))
    good_inode = good.stat().st_ino

    again = stage(model, ranges, cache, fnv, threshold=100, verified=verified)
    assert (again.staged, again.rewritten, again.present) == (1, 1, 1)
    assert bad.read_bytes() == data[1500:] and good.stat().st_ino == good_inode
    assert first.sizes == again.sizes == (1500, 1500)


def test_staging_trusts_an_entry_verified_in_this_version(tmp_path: Path, fnv: Fnv1a,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafleet.agent import staging as staging_module

    model = model_file(tmp_path / "m.gguf", os.urandom(1000))
    verified: dict[str, tuple[int, int]] = {}
    stage(model, [ByteRange(0, 1000)], tmp_path / "rpc", fnv, threshold=100, verified=verified)

    def no_check(*args: object) -> None:
        raise AssertionError("hashed an entry verified already")

    monkeypatch.setattr(staging_module, "check_entry", no_check)
    again = stage(model, [ByteRange(0, 1000)], tmp_path / "rpc", fnv, threshold=100, verified=verified)
    assert again.present == 1


def test_an_unverified_entry_is_hashed_before_it_counts_as_present(tmp_path: Path, fnv: Fnv1a) -> None:
    data = os.urandom(1000)
    model = model_file(tmp_path / "m.gguf", data)
    name = entry_name(fnv.hash(data))
    (tmp_path / "rpc").mkdir()
    (tmp_path / "rpc" / name).write_bytes(bytes(1000))  # right size, wrong bytes, never verified
    result = stage(model, [ByteRange(0, 1000)], tmp_path / "rpc", fnv, threshold=100, verified={})
    assert (result.staged, result.rewritten, result.present) == (1, 1, 0)
    assert (tmp_path / "rpc" / name).read_bytes() == data


def test_references_to_a_changed_or_vanished_file_are_removed_and_good_ones_kept(cache: RpcCache, fnv: Fnv1a,
                                                                                   tmp_path: Path) -> None:
    data = os.urandom(1000)
    (tmp_path / "m.gguf").write_bytes(data)
    key = FileKey.of(tmp_path / "m.gguf")
    model = ModelFile("m", str(tmp_path / "m.gguf"), key.size, key.mtime_ns, "ab" * 32, "ready")
    result = stage(model, [ByteRange(0, 500), ByteRange(500, 500)], cache.cache_dir, fnv, threshold=100,
                   references=True)
    assert result.referenced == 2
    old = time.time() - 60  # past the grace for references being written
    for ref in cache.cache_dir.glob("*.ref"):
        os.utime(ref, (old, old))
    assert cache.verify(fnv, threading.Event()) == ()  # both still describe the file
    (cache.cache_dir / "0123456789abcdef.ref").write_text("not a reference\n")
    os.utime(cache.cache_dir / "0123456789abcdef.ref", (old, old))
    [malformed] = cache.verify(fnv, threading.Event())
    assert malformed.why == "malformed reference"
    os.utime(tmp_path / "m.gguf", ns=(key.mtime_ns, key.mtime_ns + 1))
    removed = cache.verify(fnv, threading.Event())
    assert len(removed) == 2 and all("changed since" in r.why for r in removed)
    assert not list(cache.cache_dir.glob("*.ref"))
