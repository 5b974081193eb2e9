"""Our GGUF header reader against gguf-py's GGUFReader (the oracle), and against hostile files."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from llamafleet.controller.gguf import GGML_TYPES, GGUFError, SkippedArray, read_gguf_header
from tests.fixtures.hostile_gguf import GOOD, HOSTILE
from tests.fixtures.synthetic_gguf import Shape, write_model

SMALL = Shape("small", 3, 512, 1024, 8, 2, 2000)


def test_type_table_matches_gguf_py() -> None:
    for qtype, (block, size) in GGML_QUANT_SIZES.items():
        assert GGML_TYPES[int(qtype)][1:] == (block, size), qtype.name


def _oracle_value(field) -> object:
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


# ---- hostile and malformed files (tests/fixtures/hostile_gguf.py) ------------------------------


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
