"""`llamafleet-agent cache ls|gc`, run as the real program over real state and cache dirs."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from llamafleet.common.fnv import Fnv1a, entry_name
from llamafleet.agent.rpc_cache import RpcCache, SlotUse

AGENT = str(Path(sys.executable).parent / "llamafleet-agent")
IDLE, SERVED = "aa" * 32, "bb" * 32


@pytest.fixture(scope="module")
def fnv(tmp_path_factory: pytest.TempPathFactory) -> Fnv1a:
    return Fnv1a(tmp_path_factory.mktemp("fnv"))


def agent_cli(tmp_path: Path, *args: str, **popen: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AGENT, "cache", *args, "--state-dir", str(tmp_path / "state"),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg")}, **popen)


def entry(cache: RpcCache, fnv: Fnv1a, data: bytes, age_s: float = 7200) -> Path:
    cache.cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache.cache_dir / entry_name(fnv.hash(data))
    path.write_bytes(data)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture
def filled(tmp_path: Path, fnv: Fnv1a) -> dict[str, Path]:
    """An idle model (2 entries, one verified), one an rpc-server still serves (this test's own
    process stands in for it), and an entry an rpc-server wrote from the network."""
    cache = RpcCache(tmp_path / "cache" / "rpc", tmp_path / "state")
    files = {"idle1": entry(cache, fnv, os.urandom(3000)), "idle2": entry(cache, fnv, os.urandom(3000)),
             "served": entry(cache, fnv, os.urandom(3000)), "network": entry(cache, fnv, os.urandom(1000))}
    me = psutil.Process()
    with cache.transaction() as state:
        state.record_stage(IDLE, "idle-model", {files["idle1"].name: 3000, files["idle2"].name: 3000}, 1_000)
        state.record_stage(SERVED, "served-model", {files["served"].name: 3000}, 500, uses={
                           1: SlotUse(SERVED, 2, me.pid, int(me.create_time() * 1000))})
        stat = files["idle1"].stat()
        state.verified[files["idle1"].name] = (stat.st_size, stat.st_mtime_ns)
    return files


def test_ls_groups_the_entries_by_model(tmp_path: Path, filled: dict[str, Path]) -> None:
    listed = agent_cli(tmp_path, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    assert doc["summary"]["entries"] == 4 and doc["summary"]["used_bytes"] == 10000
    assert doc["summary"]["in_use_bytes"] == 3000 and doc["summary"]["unverified"] == 3
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["idle-model"] | {"last_used_unix_ms": 0} == {
        "sha256": IDLE, "name": "idle-model", "entries": 2, "missing": 0, "size_bytes": 6000,
        "last_used_unix_ms": 0, "in_use": False, "rpc_server_indexes": [], "verified": 1}
    assert by_name["served-model"]["in_use"] and by_name["served-model"]["rpc_server_indexes"] == [1]
    assert doc["network"]["entries"] == 1 and doc["network"]["size_bytes"] == 1000
    assert {e["name"]: e["models"] for e in doc["entries"]}[filled["network"].name] == []

    text = agent_cli(tmp_path, "ls")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert "9.8 KiB" in lines[0] and "4 entries" in lines[0] and "2 staged models" in lines[0]
    assert lines[1].split() == ["MODEL", "SHA256", "ENTRIES", "SIZE", "LAST", "USED", "IN", "USE", "VERIFIED"]
    assert [line.split()[0] for line in lines[2:]] == ["idle-model", "served-model", "(from"]
    assert lines[3].split()[-2:] == ["#1", "0/1"]


def test_gc_evicts_the_idle_model_first_and_never_the_served_one(tmp_path: Path, filled: dict[str, Path]) -> None:
    done = agent_cli(tmp_path, "gc", "--max", "5000")
    assert done.returncode == 0, done.stderr
    assert not filled["idle1"].exists() and not filled["idle2"].exists()
    assert filled["served"].exists() and filled["network"].exists()
    assert done.stdout.count("model idle-model") == 2
    assert done.stdout.splitlines()[-1].startswith(
        "evicted 2, removed 0 corrupt (5.9 KiB freed); rpc cache now 3.9 KiB")

    # The rest is in use or the dear network entry: the network one goes, the served one never.
    over = agent_cli(tmp_path, "gc", "--max", "1KB")
    assert over.returncode == 1 and filled["served"].exists() and not filled["network"].exists()
    assert over.stderr.strip() == ("error: still 2.0 KiB over the cap of 1000 B: the rest is in use by running "
                                   "coordinators (or being written)")


def test_gc_removes_a_corrupt_entry_and_verify_all_finds_one_verified_before(tmp_path: Path,
                                                                           filled: dict[str, Path]) -> None:
    truncated = filled["idle2"]
    with truncated.open("r+b") as handle:
        handle.truncate(100)
    os.utime(truncated, (time.time() - 60, time.time() - 60))
    # Rot under a verified entry that keeps its size and mtime: only --verify-all reads it again.
    rotten = filled["idle1"]
    stat = rotten.stat()
    data = bytearray(rotten.read_bytes())
    data[10] ^= 0xFF
    rotten.write_bytes(bytes(data))
    os.utime(rotten, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    plain = agent_cli(tmp_path, "gc")
    assert plain.returncode == 0, plain.stderr
    assert f"removed {truncated.name} (100 B): truncated: 100 of 3000 bytes" in plain.stdout
    assert rotten.exists() and not truncated.exists()

    everything = agent_cli(tmp_path, "gc", "--verify-all")
    assert everything.returncode == 0, everything.stderr
    assert f"removed {rotten.name} (2.9 KiB): corrupted" in everything.stdout and not rotten.exists()
    assert filled["served"].exists() and filled["network"].exists()
    status = json.loads(agent_cli(tmp_path, "ls", "--json").stdout)["summary"]
    assert status["corrupt_removed"] == 2 and status["unverified"] == 0


def test_gc_waits_for_a_staging_that_holds_the_lock(tmp_path: Path, filled: dict[str, Path]) -> None:
    with open(tmp_path / "state" / "rpc-cache.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the agent does while it stages
        waiting = subprocess.Popen([AGENT, "cache", "gc", "--max", "5000", "--state-dir", str(tmp_path / "state"),
                                    "--cache-dir", str(tmp_path / "cache")], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert waiting.stderr is not None
        assert "waiting for the agent to finish a staging" in waiting.stderr.readline()
        assert filled["idle1"].exists()  # nothing evicted under a staging
    out, _ = waiting.communicate(timeout=30)
    assert waiting.returncode == 0 and "evicted 2" in out and not filled["idle1"].exists()


@pytest.mark.parametrize(("args", "message"), [
    (("gc", "--max", "lots"), "error: --max: not a size: 'lots'"),
    (("gc", "--max", "-1GiB"), "error: --max: not a size: '-1GiB'"),
])
def test_a_bad_max_is_one_line_and_exit_code_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    done = agent_cli(tmp_path, *args)
    assert done.returncode == 2 and done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1


def test_a_state_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    done = subprocess.run([AGENT, "cache", "gc", "--state-dir", str(tmp_path / "file" / "state"),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"error: cannot clean the rpc cache {tmp_path}/cache/rpc: Not a directory "
                           f"({tmp_path}/file/state)\n")


def test_ls_of_an_empty_cache(tmp_path: Path) -> None:
    done = agent_cli(tmp_path, "ls", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["summary"]["entries"] == 0 and doc["models"] == [] and doc["summary"]["max_bytes"] > 0
    assert not (tmp_path / "state").exists()  # ls writes nothing
