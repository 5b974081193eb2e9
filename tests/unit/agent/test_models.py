"""The agent's model store: listing, bounds, hashing off the loop, and the digest cache."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from pathlib import Path

import pytest

from llamafleet.agent import models as models_module
from llamafleet.agent.convert import model_file_to_proto
from llamafleet.agent.models import ModelIndex, scan
from llamafleet.common.model_names import MAX_NAME_CHARS
from llamafleet.common import digests
from llamafleet.common.digests import DigestCache, FileKey, HashCancelled, sha256_file
from llamafleet.proto.v1 import agent_pb2 as pb


def fake_gguf(path: Path, payload: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + payload)
    return hashlib.sha256(b"GGUF" + payload).hexdigest()


def test_lists_gguf_files_and_one_level_of_folders(tmp_path: Path) -> None:
    root = tmp_path / "models"
    fake_gguf(root / "gemma.gguf", b"a")
    fake_gguf(root / "llama3" / "8b-q8_0.gguf", b"b")
    fake_gguf(root / "deep" / "er" / "hidden.gguf", b"c")  # two levels down: not indexed
    fake_gguf(root / ".partial.gguf", b"d")  # hidden: a copy in progress
    (root / "notes.txt").write_text("not a model")
    (root / "dangling.gguf").symlink_to(tmp_path / "nowhere.gguf")
    (root / "linked.gguf").symlink_to(root / "gemma.gguf")
    result = scan(root)
    assert [name for name, _ in result.found] == ["gemma", "linked", "llama3/8b-q8_0"]
    assert result.omitted == 0
    assert all(key.size == 5 for _, key in result.found)


def test_bounds_count_what_is_left_out(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for i in range(5):
        fake_gguf(root / f"m{i}.gguf", bytes([i]))
    fake_gguf(root / f"{'x' * (MAX_NAME_CHARS - 4)}" / "long.gguf", b"z")  # name 256 characters
    fake_gguf(root / f"{'y' * (MAX_NAME_CHARS - 4)}" / "ok.gguf", b"z")  # name 254 characters
    result = scan(root, max_files=3)
    assert [name for name, _ in result.found] == ["m0", "m1", "m2"]
    assert result.omitted == 4
    unbounded = scan(root)
    assert [name for name, _ in unbounded.found][-1].startswith("yyy") and unbounded.omitted == 1


def run_refresh(index: ModelIndex) -> None:
    asyncio.run(index.refresh())


def test_files_show_hashing_first_then_their_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "models"
    expected = fake_gguf(root / "gemma.gguf", b"weights" * 1000)
    seen: list[tuple[str, str]] = []
    index = ModelIndex(root, tmp_path / "state")
    index._on_change = lambda: seen.extend((f.state, f.sha256) for f in index.files)  # noqa: SLF001
    loop_thread: list[int] = []
    hash_threads: list[int] = []
    real = models_module.sha256_file

    def spying(path: Path, stop: threading.Event | None = None) -> str:
        hash_threads.append(threading.get_ident())
        return real(path, stop)

    monkeypatch.setattr(models_module, "sha256_file", spying)

    async def go() -> None:
        loop_thread.append(threading.get_ident())
        await index.refresh()

    asyncio.run(go())
    assert seen == [("hashing", ""), ("ready", expected)]
    assert hash_threads and loop_thread[0] not in hash_threads  # never on the event loop
    file = index.files[0]
    assert (file.name, file.size_bytes, file.path) == ("gemma", 7004, str(root.absolute() / "gemma.gguf"))
    wire = model_file_to_proto(file)
    assert wire.state == pb.MODEL_FILE_STATE_READY and wire.sha256 == expected


def test_a_restart_reuses_the_cache_and_a_changed_file_is_hashed_again(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root, state = tmp_path / "models", tmp_path / "state"
    fake_gguf(root / "a.gguf", b"one")
    run_refresh(ModelIndex(root, state))
    assert (state / models_module.DIGEST_CACHE).is_file()
    hashed: list[str] = []
    real = models_module.sha256_file
    monkeypatch.setattr(models_module, "sha256_file",
                        lambda path, stop=None: hashed.append(path.name) or real(path, stop))  # type: ignore[func-returns-value]
    again = ModelIndex(root, state)  # a new agent process over the same state dir
    run_refresh(again)
    assert hashed == [] and again.files[0].state == "ready"
    changed = fake_gguf(root / "a.gguf", b"two, longer")
    os.utime(root / "a.gguf", ns=(1, 1))
    run_refresh(again)
    assert hashed == ["a.gguf"] and again.files[0].sha256 == changed


def test_a_damaged_cache_means_a_rehash_not_a_failure(tmp_path: Path) -> None:
    root, state = tmp_path / "models", tmp_path / "state"
    expected = fake_gguf(root / "a.gguf", b"one")
    state.mkdir()
    (state / models_module.DIGEST_CACHE).write_text("{not json")
    index = ModelIndex(root, state)
    run_refresh(index)
    assert index.files[0].sha256 == expected


def test_an_unreadable_file_is_an_error_and_is_tried_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "models"
    expected = fake_gguf(root / "a.gguf", b"one")
    real = models_module.sha256_file

    def refusing(path: Path, stop: threading.Event | None = None) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(models_module, "sha256_file", refusing)
    index = ModelIndex(root, tmp_path / "state")
    run_refresh(index)
    assert index.files[0].state == "error" and "Permission denied" in index.files[0].error
    monkeypatch.setattr(models_module, "sha256_file", real)
    run_refresh(index)
    assert index.files[0].state == "ready" and index.files[0].sha256 == expected


def test_a_removed_file_leaves_the_index_and_the_cache(tmp_path: Path) -> None:
    root, state = tmp_path / "models", tmp_path / "state"
    fake_gguf(root / "a.gguf", b"one")
    fake_gguf(root / "b.gguf", b"two")
    index = ModelIndex(root, state)
    run_refresh(index)
    (root / "a.gguf").unlink()
    run_refresh(index)
    assert [f.name for f in index.files] == ["b"]
    assert [k.path for k in DigestCache(state / models_module.DIGEST_CACHE)._entries] == [  # noqa: SLF001
        str(root.absolute() / "b.gguf")]


def test_a_hash_stops_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digests, "CHUNK_BYTES", 4)
    path = tmp_path / "big.gguf"
    path.write_bytes(b"x" * 64)
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashCancelled):
        sha256_file(path, stop)
    assert sha256_file(path) == hashlib.sha256(b"x" * 64).hexdigest()
    assert FileKey.of(path).size == 64
