"""Our GGUF header reader against gguf-py's GGUFReader (the oracle), and against hostile files."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from llamafleet.controller.gguf import GGML_TYPES, GGUFError, SkippedArray, read_gguf_header
from tests.fixtures.synthetic_gguf import Shape, write_model

SMALL = Shape("small", 3, 512, 1024, 8, 2, 2000)


def test_type_table_matches_gguf_py() -> None:
    for qtype, (block, size) in GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)][1:] == (block, size), qtype.name


def _oracle_value(field) -> object:  # type: ignore[no-untyped-def]
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        return len(field.data)
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode()
    return field.parts[field.data[0]].tolist()[0]


def compare_with_oracle(path: Path) -> None:
    ours = read_gguf_header(path)
    oracle = GGUFReader(path)
    for key, field in oracle.fields.items():
        if key.startswith("GGUF."):
            continue
        value = ours.metadata[key]
        expected = _oracle_value(field)
        if isinstance(value, SkippedArray):
            assert value.count == expected, key
        elif isinstance(value, list):
            assert len(value) == expected, key
        elif isinstance(value, float):
            assert value == pytest.approx(expected), key
        else:
            assert value == expected, key
    assert len(ours.tensors) == len(oracle.tensors)
    for mine, theirs in zip(ours.tensors, oracle.tensors, strict=True):
        assert mine.name == theirs.name
        assert mine.shape == tuple(int(d) for d in theirs.shape)
        assert mine.ggml_type == int(theirs.tensor_type)
        assert mine.n_bytes == int(theirs.n_bytes)
        assert ours.data_offset + mine.offset == int(theirs.data_offset)


def test_synthetic_model_matches_the_oracle(tmp_path: Path) -> None:
    compare_with_oracle(write_model(tmp_path / "small.gguf", SMALL))


# ---- hostile and malformed files --------------------------------------------------------------

def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


def _file(kvs: list[bytes], tensors: list[bytes], *, magic: bytes = b"GGUF", version: int = 3,
          kv_count: int | None = None, tensor_count: int | None = None, data: int = 64) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                               len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * ((-len(body)) % 32) + b"\0" * data


ARCH = _kv("general.architecture", 8, _s("llama"))
GOOD = _file([ARCH], [_tensor("blk.0.w", [16], 0)])

HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "too short"),
    "bad magic": (b"GGML" + GOOD[4:], "not a GGUF file"),
    "version 1": (_file([ARCH], [], version=1), "version 1 is not supported"),
    "version 99": (_file([ARCH], [], version=99), "version 99 is not supported"),
    "absurd kv count": (_file([ARCH], [], kv_count=2**62), "metadata entries"),
    "absurd tensor count": (_file([ARCH], [], tensor_count=2**62), "tensor entries"),
    "kv count past the entries": (_file([ARCH], [], kv_count=50, data=0), "truncated"),
    "key length past EOF": (_file([struct.pack("<Q", 2**40)], []), "limit"),
    "string value past EOF": (_file([_s("k") + struct.pack("<I", 8) + struct.pack("<Q", 10_000)], [], data=0), "truncated"),
    "unknown value type": (_file([_kv("k", 77, b"")], []), "unknown value type 77"),
    "unknown array element type": (_file([_kv("k", 9, struct.pack("<IQ", 55, 1))], []), "unknown array element type"),
    "array count absurd": (_file([_kv("k", 9, struct.pack("<IQ", 4, 2**61))], []), "truncated"),
    "string array count absurd": (_file([_kv("k", 9, struct.pack("<IQ", 8, 2**60))], []), "truncated"),
    "string array cut short": (_file([_kv("k", 9, struct.pack("<IQ", 8, 5000) + _s("a") * 10)], [], data=0), "truncated"),
    "nested arrays too deep": (_file([_kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 9, 1) +
                                          struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))], []), "nested deeper"),
    "non-UTF-8 key": (_file([_s(b"\xff\xfe") + struct.pack("<II", 4, 1)], []), "not UTF-8"),
    "tensor with 0 dims": (_file([ARCH], [_tensor("t", [])]), "0 dimensions"),
    "tensor with 5 dims": (_file([ARCH], [_tensor("t", [1, 1, 1, 1, 1])]), "5 dimensions"),
    "unknown tensor type": (_file([ARCH], [_tensor("t", [32], 4)]), "unknown ggml type 4"),
    "tensor data past EOF": (_file([ARCH], [_tensor("t", [1 << 20], 0)]), "truncated: tensor 't'"),
    "tensor offset past EOF": (_file([ARCH], [_tensor("t", [16], 0, 2**50)]), "truncated: tensor 't'"),
    "block size mismatch": (_file([ARCH], [_tensor("t", [33], 8)]), "not a multiple of the block size"),
    "bad alignment": (_file([ARCH, _kv("general.alignment", 4, struct.pack("<I", 3))], []), "not a power of two"),
    "header cut in the middle": (GOOD[:30], "truncated"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_clear_errors(tmp_path: Path, case: str) -> None:
    content, message = HOSTILE[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFError, match=message) as caught:
        read_gguf_header(path)
    assert "\n" not in str(caught.value)


def test_the_well_formed_base_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(GOOD)
    header = read_gguf_header(path)
    assert header.architecture == "llama" and header.tensors[0].n_bytes == 64


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="model file not found"):
        read_gguf_header(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        read_gguf_header(tmp_path)


def test_large_arrays_are_skipped_not_materialised(tmp_path: Path) -> None:
    header = read_gguf_header(write_model(tmp_path / "m.gguf", SMALL))
    assert header.metadata["tokenizer.ggml.tokens"] == SkippedArray(8, 2000)
