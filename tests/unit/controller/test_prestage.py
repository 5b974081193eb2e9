"""Which byte ranges of the GGUF each node of a plan pre-stages."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGUFReader

from llamafleet.controller.gguf import read_gguf_header
from llamafleet.controller.placement.plan import DeviceAssignment
from llamafleet.controller.prestage import HASH_THRESHOLD, every_large_tensor, node_ranges
from tests.fixtures.synthetic_gguf import Shape, write_model

TINY = Shape("tiny", 4, 256, 512, 4, 4, 1000)


def device(node: str, first: int, count: int, name: str = "CPU") -> DeviceAssignment:
    return DeviceAssignment(node, f"{node}:1", name, first, count, 0, 0, 0, 0, 0)


def oracle(path: Path) -> dict[str, tuple[int, int]]:
    """gguf-py's own reading of where each tensor's bytes lie in the file."""
    return {t.name: (int(t.data_offset), int(t.n_bytes)) for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("tied", [False, True])
def test_each_node_gets_its_layers_and_the_last_the_output(tmp_path: Path, tied: bool) -> None:
    path = write_model(tmp_path / "m.gguf", Shape(**{**TINY.__dict__, "tied_output": tied}))
    where = oracle(path)
    plan = [device("a", 0, 1), device("b", 1, 3)]
    got = node_ranges(read_gguf_header(path), plan, threshold=0)
    layer = lambda i: [where[n] for n in where if n.startswith(f"blk.{i}.")]  # noqa: E731
    assert got["a"] == layer(0)
    output = [where["output_norm.weight"], where["token_embd.weight" if tied else "output.weight"]]
    assert got["b"] == layer(1) + layer(2) + layer(3) + output


def test_a_node_with_two_devices_gets_the_union_once(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", TINY)
    where = oracle(path)
    plan = [device("a", 0, 1, "CUDA0"), device("a", 1, 1, "CUDA1"), device("b", 2, 2)]
    got = node_ranges(read_gguf_header(path), plan, threshold=0)
    assert got["a"] == [where[n] for n in where if n.startswith(("blk.0.", "blk.1."))]
    assert where["output.weight"] in got["b"] and where["output.weight"] not in got["a"]


def test_only_tensors_above_the_hash_threshold_are_asked_for(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", TINY)
    header = read_gguf_header(path)
    sizes = {t.name: t.n_bytes for t in header.tensors}
    cut = sizes["output.weight"]  # strictly greater, like llama.cpp: a tensor of exactly this size is not asked for
    got = node_ranges(header, [device("a", 0, 4)], threshold=cut - 1)
    assert got == {"a": [oracle(path)["output.weight"]]}
    assert node_ranges(header, [device("a", 0, 4)], threshold=cut) == {}
    assert node_ranges(header, [device("a", 0, 4)]) == {} and HASH_THRESHOLD == 10 * 1024 * 1024
    assert node_ranges(header, []) == {}


def test_after_a_pull_every_tensor_above_the_threshold_is_staged_once(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", TINY)
    where = oracle(path)
    threshold = sorted(n for _, n in where.values())[len(where) // 2]
    got = every_large_tensor(read_gguf_header(path), threshold=threshold)
    assert got == sorted({span for span in where.values() if span[1] > threshold})
    assert got and all(size > threshold for _, size in got)
    # Whatever share a later plan gives the node, its ranges are among these.
    plan = [device("a", 0, 2), device("b", 2, 2)]
    shares = node_ranges(read_gguf_header(path), plan, threshold=threshold)
    assert {span for spans in shares.values() for span in spans} <= set(got)
