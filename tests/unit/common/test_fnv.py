"""The compiled FNV-1a against the pure-Python reference, and how it is built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamafleet.common import fnv as fnv_module
from llamafleet.common.fnv import OFFSET_BASIS, Fnv1a, FnvUnavailable, entry_name, fnv1a_python


def test_reference_matches_the_published_fnv1a_vectors() -> None:
    # From the FNV reference (isthe.com/chongo/tech/comp/fnv): 64-bit FNV-1a.
    assert fnv1a_python(b"") == 0xCBF29CE484222325
    assert fnv1a_python(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_python(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize("data", [b"", b"\x00", b"a", b"foobar", bytes(range(256)) * 3, os.urandom(4099)])
def test_the_c_hash_equals_the_reference(tmp_path: Path, data: bytes) -> None:
    assert Fnv1a(tmp_path).hash(data) == fnv1a_python(data)


def test_the_state_carries_over_a_chunk_boundary_in_the_middle(tmp_path: Path) -> None:
    fnv = Fnv1a(tmp_path)
    data = os.urandom(1000)
    for cut in (0, 1, 500, 999, 1000):
        assert fnv.hash(data[cut:], fnv.hash(data[:cut])) == fnv1a_python(data)
    # Only the first `length` bytes of a reused buffer count (how a file's last chunk is hashed).
    buffer = bytearray(data)
    assert fnv.update(buffer, 10, OFFSET_BASIS) == fnv1a_python(data[:10])
    assert fnv.update(buffer, 0, 123) == 123


def test_entry_names_are_16_lowercase_hex_digits() -> None:
    assert entry_name(0xAB) == "00000000000000ab"
    assert entry_name(fnv1a_python(b"foobar")) == "85944171f73967e8"


def test_built_once_under_the_state_dir_keyed_by_the_source(tmp_path: Path) -> None:
    first = Fnv1a(tmp_path)
    first.ensure()
    library = first.library_path
    assert library.exists() and library.parent == tmp_path
    built_at = library.stat().st_mtime_ns
    Fnv1a(tmp_path).hash(b"x")  # a second agent process reuses the library
    assert library.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no temp files left behind


def test_without_a_compiler_staging_is_refused_with_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fnv_module, "_compiler", lambda: None)
    with pytest.raises(FnvUnavailable, match="no C compiler"):
        Fnv1a(tmp_path).ensure()


def test_a_failing_compiler_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fnv_module, "_compiler", lambda: "/bin/false")
    with pytest.raises(FnvUnavailable, match="failed to build"):
        Fnv1a(tmp_path).ensure()
    assert not any(tmp_path.iterdir())
