"""The controller's pre-computed tensor hashes: what llama.cpp's patched loader reads.

The format is checked against the C++ reader for real by the integration test that loads a model
through a patched llama-server (tests/integration/controller/test_patched_load.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from gguf import GGUFReader

from llamafleet.common.digests import FileKey
from llamafleet.common.fnv import Fnv1a, fnv1a_python
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.common.llamacpp.tensor_hash_file import FORMAT_LINE
from llamafleet.controller.tensor_hashes import TensorHashes
from tests.fixtures.synthetic_gguf import Shape, write_model

TINY = Shape("tiny", 2, 256, 512, 4, 4, 1000)


@pytest.fixture(scope="module")
def fnv(tmp_path_factory: pytest.TempPathFactory) -> Fnv1a:
    return Fnv1a(tmp_path_factory.mktemp("fnv"))


def _model(tmp_path: Path) -> Path:
    path = write_model(tmp_path / "m.gguf", TINY)
    # Distinct bytes per tensor (the fixture writes zeros), so a wrong range gives a wrong hash.
    with path.open("r+b") as handle:
        for t in GGUFReader(str(path)).tensors:
            handle.seek(int(t.data_offset))
            handle.write(os.urandom(int(t.n_bytes)))
    return path


def test_every_tensor_above_the_threshold_is_hashed_as_llama_cpp_would(tmp_path: Path, fnv: Fnv1a) -> None:
    path = _model(tmp_path)
    hashes = TensorHashes(tmp_path / "state", fnv, workers=3, threshold=100_000)
    made = asyncio.run(hashes.ensure(path, read_gguf_header(path)))
    assert made is not None and made.path.parent == tmp_path / "state" / "tensor-hashes"
    lines = made.path.read_text().splitlines()
    key = FileKey.of(path)
    assert lines[:2] == [FORMAT_LINE, f"{key.size} {key.mtime_ns}"]
    data = path.read_bytes()
    expected = sorted((int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(str(path)).tensors
                      if int(t.n_bytes) > 100_000)
    assert expected, "the fixture has tensors above the threshold"
    got = [tuple(line.split()) for line in lines[2:]]
    assert got == [(str(o), str(n), f"{fnv1a_python(data[o:o + n]):016x}") for o, n in expected]
    assert made.values == {(o, n): fnv1a_python(data[o:o + n]) for o, n in expected}
    # Read back by a later load: the same values, from the file.
    assert asyncio.run(TensorHashes(tmp_path / "state", fnv, threshold=100_000).ensure(
        path, read_gguf_header(path))) == made


def test_a_second_load_reads_the_file_and_a_changed_model_gets_a_new_one(tmp_path: Path, fnv: Fnv1a) -> None:
    path = _model(tmp_path)
    hashes = TensorHashes(tmp_path / "state", fnv, threshold=100_000)
    made = asyncio.run(hashes.ensure(path, read_gguf_header(path)))
    assert made is not None
    first = made.path
    mtime = first.stat().st_mtime_ns
    assert asyncio.run(hashes.ensure(path, read_gguf_header(path))) == made
    assert first.stat().st_mtime_ns == mtime  # not computed again
    os.utime(path, ns=(mtime, mtime + 1_000_000_000))
    second = asyncio.run(hashes.ensure(path, read_gguf_header(path)))
    assert second is not None and second.path != first
    assert second.path.read_text().splitlines()[1].endswith(str(FileKey.of(path).mtime_ns))


def test_concurrent_loads_share_one_computation(tmp_path: Path, fnv: Fnv1a, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _model(tmp_path)
    hashes = TensorHashes(tmp_path / "state", fnv, threshold=100_000)
    calls = []
    original = hashes._compute

    def counting(*args: object) -> object:
        calls.append(1)
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(hashes, "_compute", counting)

    async def both() -> list[object]:
        header = read_gguf_header(path)
        return list(await asyncio.gather(hashes.ensure(path, header), hashes.ensure(path, header)))

    a, b = asyncio.run(both())
    assert a == b and a is not None and len(calls) == 1


def test_no_compiler_means_no_file_and_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafleet.common import fnv as fnv_module

    monkeypatch.setattr(fnv_module, "_compiler", lambda: None)
    path = _model(tmp_path)
    hashes = TensorHashes(tmp_path / "state", Fnv1a(tmp_path / "nofnv"), threshold=100_000)
    assert asyncio.run(hashes.ensure(path, read_gguf_header(path))) is None
    assert not (tmp_path / "state" / "tensor-hashes").exists() or not list((tmp_path / "state" / "tensor-hashes").iterdir())
