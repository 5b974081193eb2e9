"""Placement prefers nodes that hold the model, without ever using more nodes; holders by sha256."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from llamafleet.controller.estimate import estimate_memory
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.controller.holders import DIGEST_CACHE, DigestUnavailable, ModelDigests, find_holders
from llamafleet.controller.placement.nodes import DeviceView, ModelFileView, NodeView
from llamafleet.controller.placement.plan import Plan, make_plan
from tests.fixtures.synthetic_gguf import LLAMA_8B, LLAMA_70B, Shape, write_model

GiB = 2**30


def gpu_node(address: str, gib: float, files: tuple[ModelFileView, ...] = ()) -> NodeView:
    total = int(gib * GiB)
    return NodeView(address, "ready", "running", address.replace(":50051", ":50052"), "7.0.0",
                    (DeviceView("CUDA0", total, total),), model_files=files)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {s.name: write_model(folder / f"{s.name}.gguf", s) for s in (LLAMA_8B, LLAMA_70B)}


def plan(models: dict[str, Path], shape: Shape, nodes: list[NodeView], holders: set[str]) -> Plan:
    header = read_gguf_header(models[shape.name])
    return make_plan(shape.name, estimate_memory(header, 8192), nodes, "7.0.0", holders=frozenset(holders))


def chosen(p: Plan) -> set[str]:
    return {a.node for a in p.assignments}


def test_a_holder_wins_a_tie(models: dict[str, Path]) -> None:
    fleet = [gpu_node("10.0.0.1:50051", 24), gpu_node("10.0.0.2:50051", 24)]
    assert chosen(plan(models, LLAMA_8B, fleet, set())) == {"10.0.0.1:50051"}  # the address breaks the tie
    preferred = plan(models, LLAMA_8B, fleet, {"10.0.0.2:50051"})
    assert chosen(preferred) == {"10.0.0.2:50051"} and preferred.holders == ["10.0.0.2:50051"]
    assert preferred.holder_reason.startswith("1 of the 1 chosen node(s) hold the model")
    assert preferred.excluded["10.0.0.1:50051"].startswith("not needed")


def test_a_holder_with_less_room_wins_when_the_count_stays(models: dict[str, Path]) -> None:
    fleet = [gpu_node("10.0.0.1:50051", 80), gpu_node("10.0.0.2:50051", 16)]
    preferred = plan(models, LLAMA_8B, fleet, {"10.0.0.2:50051"})
    assert chosen(preferred) == {"10.0.0.2:50051"}
    assert "preferred over nodes with more room" in preferred.holder_reason


def test_holders_never_cost_an_extra_node(models: dict[str, Path]) -> None:
    # The holder is too small to take the model alone, the big node is not: one node, no holder.
    fleet = [gpu_node("10.0.0.1:50051", 24), gpu_node("10.0.0.2:50051", 2)]
    p = plan(models, LLAMA_8B, fleet, {"10.0.0.2:50051"})
    assert p.fits and chosen(p) == {"10.0.0.1:50051"} and p.holders == []
    assert "0 of the 1 chosen" in p.holder_reason


def test_a_holder_joins_a_split_in_place_of_a_bigger_node(models: dict[str, Path]) -> None:
    fleet = [gpu_node("10.0.0.1:50051", 30), gpu_node("10.0.0.2:50051", 30), gpu_node("10.0.0.3:50051", 25)]
    without = plan(models, LLAMA_70B, fleet, set())
    assert chosen(without) == {"10.0.0.1:50051", "10.0.0.2:50051"}
    p = plan(models, LLAMA_70B, fleet, {"10.0.0.3:50051"})
    assert len(chosen(p)) == 2 and "10.0.0.3:50051" in chosen(p) and p.holders == ["10.0.0.3:50051"]
    assert sum(a.layer_count for a in p.assignments) == p.estimate.n_layers
    assert all(a.total_bytes <= a.usable_bytes for a in p.assignments)


def file_of(path: Path, sha: str = "") -> ModelFileView:
    return ModelFileView(path.stem, path.stat().st_size, sha)


def test_holders_match_by_size_then_by_sha256(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"w" * 1000)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    digests = ModelDigests(tmp_path / "state")
    nodes = [gpu_node("a:1", 8, (file_of(model, sha),)),
             gpu_node("b:1", 8, (file_of(model, "0" * 64),)),  # same size, other bytes
             gpu_node("c:1", 8, (file_of(model, ""),)),  # same size, its agent still hashing
             gpu_node("d:1", 8)]
    try:
        first = find_holders(model, nodes, digests)
        assert first.addresses == frozenset() and "not confirmed yet" in first.note  # ours is being hashed
        digests.wait(10)
        holders = find_holders(model, nodes, digests)
        assert holders.sha256 == sha and holders.addresses == {"a:1"}
        assert "1 more still hashing" in holders.note
        # A restarted controller knows the digest without reading the file again.
        again = ModelDigests(tmp_path / "state")
        assert again.digest(model) == sha
        again.close()
    finally:
        digests.close()


def test_no_file_of_the_size_means_no_hash_at_all(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"w" * 1000)
    other = tmp_path / "o.gguf"
    other.write_bytes(b"GGUF")
    digests = ModelDigests(tmp_path / "state")
    try:
        holders = find_holders(model, [gpu_node("a:1", 8, (file_of(other, "1" * 64),))], digests)
        digests.wait(10)
        assert holders.addresses == frozenset() and holders.note == "no node holds the model's file"
        assert not (tmp_path / "state" / DIGEST_CACHE).exists()
    finally:
        digests.close()


def test_a_pull_waits_for_the_digest_and_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" * 1000)
    digests = ModelDigests(tmp_path / "state")

    async def run() -> None:
        assert digests.known(path) is None
        assert await digests.sha256_of(path) == hashlib.sha256(b"GGUF" * 1000).hexdigest()
        assert digests.known(path) == hashlib.sha256(b"GGUF" * 1000).hexdigest()
        path.unlink()
        path.mkdir()  # another version, which cannot be read as a file (even by root)
        with pytest.raises(DigestUnavailable, match="cannot hash .*m.gguf: Is a directory"):
            await digests.sha256_of(path)

    try:
        asyncio.run(run())
    finally:
        digests.close()
