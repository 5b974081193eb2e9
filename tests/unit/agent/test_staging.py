"""Pre-staging's file work: entries named and filled as rpc-server writes them, checks and refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamafleet.agent import staging as staging_module
from llamafleet.common.fnv import Fnv1a, entry_name, fnv1a_python
from llamafleet.common.wire_limits import MAX_RANGES
from llamafleet.agent.models import ModelFile
from llamafleet.agent.staging import (
    ByteRange,
    StagingRefused,
    check_ranges,
    check_request,
    find_model,
    stage,
)
from llamafleet.common.digests import FileKey
from llamafleet.common.errors import UsageError

SHA = "ab" * 32
THRESHOLD = 100  # the real one is 10 MiB; the logic is the same


@pytest.fixture(scope="module")
def fnv(tmp_path_factory: pytest.TempPathFactory) -> Fnv1a:
    return Fnv1a(tmp_path_factory.mktemp("fnv"))


def model_file(path: Path, data: bytes, sha: str = SHA, state: str = "ready") -> ModelFile:
    path.write_bytes(data)
    key = FileKey.of(path)
    return ModelFile(path.stem, str(path), key.size, key.mtime_ns, sha if state == "ready" else "", state)


def test_entries_are_the_ranges_bytes_named_by_their_fnv1a(tmp_path: Path, fnv: Fnv1a) -> None:
    data = os.urandom(5000)
    model = model_file(tmp_path / "m.gguf", data)
    ranges = [ByteRange(10, 300), ByteRange(400, 50), ByteRange(1000, 3999), ByteRange(4999, 1)]
    cache = tmp_path / "cache" / "rpc"
    result = stage(model, ranges, cache, fnv, threshold=THRESHOLD, chunk_bytes=64)  # many chunks per range
    names = [entry_name(fnv1a_python(data[10:310])), entry_name(fnv1a_python(data[1000:4999]))]
    assert result.entries == tuple(names)
    assert (result.staged, result.present, result.skipped_small, result.rewritten) == (2, 0, 2, 0)
    assert result.bytes_written == result.cached_bytes == 300 + 3999
    assert sorted(p.name for p in cache.iterdir()) == sorted(names)  # no temp file left, nothing small
    assert (cache / names[0]).read_bytes() == data[10:310]
    assert (cache / names[1]).read_bytes() == data[1000:4999]


def test_the_threshold_is_strictly_greater_like_llama_cpp(tmp_path: Path, fnv: Fnv1a) -> None:
    model = model_file(tmp_path / "m.gguf", os.urandom(300))
    result = stage(model, [ByteRange(0, THRESHOLD), ByteRange(0, THRESHOLD + 1)], tmp_path / "rpc", fnv,
                   threshold=THRESHOLD)
    assert (result.staged, result.skipped_small) == (1, 1)


def test_present_entries_are_kept_and_wrong_sized_ones_rewritten(tmp_path: Path, fnv: Fnv1a) -> None:
    data = os.urandom(2000)
    model = model_file(tmp_path / "m.gguf", data)
    ranges = [ByteRange(0, 1000), ByteRange(1000, 1000)]
    cache = tmp_path / "rpc"
    first = stage(model, ranges, cache, fnv, threshold=THRESHOLD)
    kept, truncated = (cache / name for name in first.entries)
    kept_inode = kept.stat().st_ino
    truncated.write_bytes(data[1000:1500])  # what a crashed rpc-server write leaves
    again = stage(model, ranges, cache, fnv, threshold=THRESHOLD)
    assert (again.staged, again.present, again.rewritten, again.bytes_written) == (1, 1, 1, 1000)
    assert again.cached_bytes == 2000
    assert truncated.read_bytes() == data[1000:]
    assert kept.stat().st_ino == kept_inode  # not written again


def test_remembered_hashes_spare_reading_the_file_again(tmp_path: Path, fnv: Fnv1a,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_file(tmp_path / "m.gguf", os.urandom(1000))
    memo: dict[tuple[FileKey, int, int], int] = {}
    first = stage(model, [ByteRange(0, 1000)], tmp_path / "rpc", fnv, threshold=THRESHOLD, hashes=memo)

    def no_reads(*args: object) -> int:
        raise AssertionError("hashed again")

    monkeypatch.setattr(staging_module, "hash_range", no_reads)
    again = stage(model, [ByteRange(0, 1000)], tmp_path / "rpc", fnv, threshold=THRESHOLD, hashes=memo)
    assert again.entries == first.entries and again.present == 1


def test_a_file_changed_since_it_was_hashed_is_refused(tmp_path: Path, fnv: Fnv1a) -> None:
    model = model_file(tmp_path / "m.gguf", os.urandom(1000))
    (tmp_path / "m.gguf").write_bytes(os.urandom(1001))
    with pytest.raises(StagingRefused, match="changed since it was hashed"):
        stage(model, [ByteRange(0, 500)], tmp_path / "rpc", fnv, threshold=THRESHOLD)
    assert not (tmp_path / "rpc").exists()


def test_a_range_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    model = model_file(tmp_path / "m.gguf", b"x" * 1000)
    check_ranges(model, [ByteRange(0, 1000), ByteRange(999, 1)])
    with pytest.raises(UsageError, match=r"range #1 \(offset 999, 2 bytes\) runs past the end of m \(1000 bytes\)"):
        check_ranges(model, [ByteRange(0, 10), ByteRange(999, 2)])


@pytest.mark.parametrize(("sha", "ranges", "message"), [
    ("AB" * 32, [ByteRange(0, 1)], "64 lowercase hex digits"),
    ("ab" * 31, [ByteRange(0, 1)], "64 lowercase hex digits"),
    (SHA, [], "no byte ranges"),
    (SHA, [ByteRange(0, 1)] * (MAX_RANGES + 1), f"at most {MAX_RANGES} byte ranges"),
    (SHA, [ByteRange(0, 1), ByteRange(5, 0)], r"range #1 \(offset 5\) is empty"),
])
def test_bad_requests_are_one_line_usage_errors(sha: str, ranges: list[ByteRange], message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        check_request(sha, ranges)
    assert "\n" not in caught.value.message


def test_the_limit_itself_is_accepted() -> None:
    check_request(SHA, [ByteRange(0, 1)] * MAX_RANGES)


def test_only_a_ready_file_with_that_sha256_is_staged(tmp_path: Path) -> None:
    ready = model_file(tmp_path / "a.gguf", b"a")
    other = model_file(tmp_path / "b.gguf", b"b", sha="cd" * 32)
    assert find_model([other, ready], SHA) == ready
    with pytest.raises(StagingRefused, match="holds no model file with sha256 cdcdcdcdcdcd"):
        find_model([ready], "cd" * 32)
    hashing = model_file(tmp_path / "c.gguf", b"c", state="hashing")
    with pytest.raises(StagingRefused, match="still hashing"):
        find_model([hashing], SHA)
    errored = ModelFile("e", str(tmp_path / "e.gguf"), 1, 0, SHA, "error", "cannot read")
    with pytest.raises(StagingRefused, match="holds no model file"):
        find_model([errored], SHA)


def test_a_stop_gives_up_between_chunks_and_leaves_no_temp_file(tmp_path: Path, fnv: Fnv1a) -> None:
    import threading

    from llamafleet.agent.staging import _copy_range
    from llamafleet.common.digests import HashCancelled

    model = model_file(tmp_path / "m.gguf", os.urandom(1000))
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashCancelled):
        stage(model, [ByteRange(0, 1000)], tmp_path / "rpc", fnv, stop, threshold=THRESHOLD)
    (tmp_path / "out").mkdir()
    fd = os.open(model.path, os.O_RDONLY)
    try:
        with pytest.raises(HashCancelled):
            _copy_range(fd, ByteRange(0, 1000), tmp_path / "out" / "entry", bytearray(64), stop)
    finally:
        os.close(fd)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_file_rewritten_in_place_while_staging_leaves_no_entry(tmp_path: Path, fnv: Fnv1a,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.gguf"
    model = model_file(path, os.urandom(1000))
    copy = staging_module._copy_range

    def copy_then_rewrite(*args: object, **kwargs: object) -> None:
        copy(*args, **kwargs)  # type: ignore[arg-type]
        with path.open("r+b") as handle:  # rsync --inplace, a pull over the same file
            handle.write(os.urandom(10))
        os.utime(path, ns=(model.mtime_ns + 10**9, model.mtime_ns + 10**9))

    monkeypatch.setattr(staging_module, "_copy_range", copy_then_rewrite)
    with pytest.raises(StagingRefused, match="changed while it was being staged"):
        stage(model, [ByteRange(0, 500)], tmp_path / "rpc", fnv, threshold=THRESHOLD)
    assert list((tmp_path / "rpc").iterdir()) == []


def test_references_name_the_span_and_copy_nothing(tmp_path: Path, fnv: Fnv1a) -> None:
    data = os.urandom(3000)
    model = model_file(tmp_path / "m.gguf", data)
    ranges = [ByteRange(0, 1000), ByteRange(1000, 2000)]
    result = stage(model, ranges, tmp_path / "rpc", fnv, threshold=THRESHOLD, references=True)
    assert result.staged == result.referenced == 2 and result.bytes_written == 0 and result.cached_bytes == 3000
    names = [entry_name(fnv1a_python(data[:1000])), entry_name(fnv1a_python(data[1000:]))]
    assert list(result.entries) == names
    assert sorted(p.name for p in (tmp_path / "rpc").iterdir()) == sorted(f"{n}.ref" for n in names)
    assert (tmp_path / "rpc" / f"{names[1]}.ref").read_text() == (
        f"llama-rpc-ref 1\n{model.path}\n1000 2000 3000 {model.mtime_ns}\n")
    again = stage(model, ranges, tmp_path / "rpc", fnv, threshold=THRESHOLD, references=True)
    assert again.present == 2 and again.staged == 0


def test_a_reference_replaces_a_truncated_full_entry_that_would_shadow_it(tmp_path: Path, fnv: Fnv1a) -> None:
    data = os.urandom(1000)
    model = model_file(tmp_path / "m.gguf", data)
    (tmp_path / "rpc").mkdir()
    name = entry_name(fnv1a_python(data))
    (tmp_path / "rpc" / name).write_bytes(data[:10])  # what a crashed rpc-server leaves behind
    result = stage(model, [ByteRange(0, 1000)], tmp_path / "rpc", fnv, threshold=THRESHOLD, references=True)
    assert result.rewritten == 1 and result.referenced == 1
    assert not (tmp_path / "rpc" / name).exists() and (tmp_path / "rpc" / f"{name}.ref").exists()


def test_hashes_the_controller_sent_spare_reading_the_file(tmp_path: Path, fnv: Fnv1a,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(1000)
    model = model_file(tmp_path / "m.gguf", data)

    def no_reads(*args: object) -> int:
        raise AssertionError("read the file")

    monkeypatch.setattr(staging_module, "hash_range", no_reads)
    known = fnv1a_python(data)
    result = stage(model, [ByteRange(0, 1000, known)], tmp_path / "rpc", fnv, threshold=THRESHOLD, references=True)
    assert result.entries == (entry_name(known),) and result.referenced == 1
