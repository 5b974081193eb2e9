"""The cache keeper loop: passes on a kick, survives its own failures without a hot loop, keeps
the cap without a compiler, and counts a model in use only while its rpc-server serves it."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any
from collections.abc import Callable
from pathlib import Path

import pytest

from llamafleet.agent import cache_keeper as keeper_module
from llamafleet.agent.cache_keeper import CacheKeeper, running_slots_alive
from llamafleet.common.fnv import Fnv1a, FnvUnavailable, entry_name
from llamafleet.agent.rpc_cache import RpcCache, SlotUse


@pytest.fixture(scope="module")
def fnv(tmp_path_factory: pytest.TempPathFactory) -> Fnv1a:
    return Fnv1a(tmp_path_factory.mktemp("fnv"))


def old_entry(cache: RpcCache, data: bytes, fnv: Fnv1a, name: str | None = None) -> Path:
    cache.cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache.cache_dir / (name or entry_name(fnv.hash(data)))
    path.write_bytes(data)
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


async def until(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_pass_evicts_to_the_cap_and_removes_a_corrupt_entry(tmp_path: Path, fnv: Fnv1a,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cache = RpcCache(tmp_path / "rpc", tmp_path / "state")
    idle = old_entry(cache, os.urandom(1000), fnv)
    served = old_entry(cache, os.urandom(1000), fnv)
    corrupt = old_entry(cache, os.urandom(1000), fnv, name="0" * 16)
    with cache.transaction() as state:
        state.record_stage("aa" * 32, "idle", {idle.name: 1000}, 1)
        state.record_stage("bb" * 32, "served", {served.name: 1000}, 0, uses={1: SlotUse("bb" * 32, 7, 4242, 0)})
    running = {1: (7, 4242)}  # slot 1 still runs the generation it was staged for
    changes: list[int] = []
    keeper = CacheKeeper(cache, fnv, 2000, 600.0, lambda: running, on_change=lambda: changes.append(1))
    caplog.set_level("INFO")

    asyncio.run(keeper.check())

    assert not idle.exists() and served.exists() and not corrupt.exists()
    summary = keeper.summary
    assert (summary.entries, summary.used_bytes, summary.max_bytes, summary.in_use_bytes) == (1, 1000, 2000, 1000)
    assert (summary.evictions, summary.corrupt_removed, summary.error) == (1, 1, "")
    assert summary.checked_at_unix_ms > 0 and changes
    assert "evicted 1 entry" in caplog.text and "model idle" in caplog.text
    assert f"removed rpc cache entry {corrupt.name}" in caplog.text


def test_the_rpc_server_moving_on_frees_its_model() -> None:
    use = SlotUse("aa" * 32, 3, 100, 0)
    assert running_slots_alive({0: (3, 100)})(0, use)
    assert not running_slots_alive({0: (4, 101)})(0, use)  # restarted: a new generation holds no tensors
    assert not running_slots_alive({})(0, use)  # stopped
    assert not running_slots_alive({1: (3, 100)})(0, use)


def test_a_failing_pass_is_logged_reported_and_retried_later(tmp_path: Path, fnv: Fnv1a,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    cache = RpcCache(tmp_path / "rpc", tmp_path / "state")
    calls: list[float] = []
    real = cache.enforce

    def broken_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "enforce", broken_once)
    monkeypatch.setattr(keeper_module, "RETRY_MIN_S", 0.3)
    keeper = CacheKeeper(cache, fnv, 0, 0.3, dict)

    async def scenario() -> None:
        task = asyncio.create_task(keeper.run())
        await until(lambda: "disk on fire" in keeper.summary.error)
        keeper.kick()  # a kick does not cut the wait after a failure short
        await until(lambda: keeper.passes >= 1)
        assert keeper.summary.error == ""
        assert not task.done()
        task.cancel()

    asyncio.run(scenario())
    assert calls[1] - calls[0] >= 0.3
    assert "rpc cache keeper pass failed" in caplog.text and "Traceback" in caplog.text


def test_a_kick_runs_a_pass_long_before_the_interval(tmp_path: Path, fnv: Fnv1a) -> None:
    cache = RpcCache(tmp_path / "rpc", tmp_path / "state")
    keeper = CacheKeeper(cache, fnv, 0, 600.0, dict)

    async def scenario() -> None:
        task = asyncio.create_task(keeper.run())
        await until(lambda: keeper.passes == 1)
        keeper.kick()
        await until(lambda: keeper.passes == 2, timeout_s=5)
        keeper.stop()
        task.cancel()

    asyncio.run(scenario())


def test_without_a_compiler_the_cap_still_holds(tmp_path: Path, fnv: Fnv1a, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RpcCache(tmp_path / "rpc", tmp_path / "state")
    old_entry(cache, os.urandom(1000), fnv)
    old_entry(cache, os.urandom(1000), fnv)

    def no_compiler(*args: object) -> None:
        raise FnvUnavailable("no C compiler")

    monkeypatch.setattr(cache, "verify", no_compiler)
    keeper = CacheKeeper(cache, fnv, 1000, 600.0, dict)
    asyncio.run(keeper.check())
    assert keeper.summary.used_bytes == 1000 and keeper.summary.evictions == 1
    assert keeper.summary.error == "cannot verify entries: no C compiler"
