"""The llama.cpp patch set (issue 16) in a real fleet: a patched coordinator uses the controller's
pre-computed tensor hashes, answers with the tokens a stock one gives, and works with stock
rpc-servers (and a stock coordinator with patched ones): the RPC protocol does not change.

Gemma's only tensor above llama.cpp's 10 MiB hash threshold is the output copy of its tied token
embeddings (170 MB, on the last rpc-server): the one tensor a patched coordinator sets by its
pre-computed hash."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from llamafleet.common.fnv import Fnv1a, entry_name
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.patches import PRECOMPUTED_HASHES_PATCH, REFERENCE_ENTRIES_PATCH
from llamafleet.controller.gguf import read_gguf_header
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet
from tests.integration.controller.test_prestage import LIMITS, cache_dir, holders_confirmed, raw_tokens, saved_lines

pytestmark = pytest.mark.integration
# A hash no tensor of gemma has: written into a hash file, it shows whether the file was used.
FAKE = "00000000deadbeef"


def coordinator_log(fleet: Fleet) -> str:
    logs = sorted((fleet.state_dir / "logs" / "coordinators").rglob("*.log"), key=lambda p: p.stat().st_mtime)
    assert logs, "no coordinator log"
    return logs[-1].read_text(errors="replace")


def hash_files(fleet: Fleet) -> list[Path]:
    folder = fleet.state_dir / "tensor-hashes"
    return sorted(folder.glob("*.txt")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def stock_tokens(tmp_path_factory: pytest.TempPathFactory, stock_llama_cpp: Manifest, test_model: Path) -> str:
    """What stock llama.cpp answers, split over the same two rpc-servers."""
    with running_fleet(tmp_path_factory.mktemp("stock"), stock_llama_cpp, test_model, memory_limit=LIMITS) as fleet:
        tokens = raw_tokens(fleet)
        assert not hash_files(fleet), "a stock coordinator gets no hashes"
    return tokens


def test_the_builds_under_test_are_what_they_say(llama_cpp: Manifest, stock_llama_cpp: Manifest) -> None:
    assert PRECOMPUTED_HASHES_PATCH in llama_cpp.patch_names and REFERENCE_ENTRIES_PATCH in llama_cpp.patch_names
    assert stock_llama_cpp.patches == []
    assert llama_cpp.rpc_protocol_version == stock_llama_cpp.rpc_protocol_version


def test_a_patched_coordinator_uses_the_hashes_and_gives_the_stock_tokens(tmp_path: Path, llama_cpp: Manifest,
                                                                           test_model: Path, stock_tokens: str) -> None:
    name, _, _ = _output_entry(test_model)
    with running_fleet(tmp_path, llama_cpp, test_model, memory_limit=LIMITS) as fleet:
        assert raw_tokens(fleet) == stock_tokens
        [hashes] = hash_files(fleet)
        assert fleet.ps()[0]["tensor_hashes"] == str(hashes)
        text = hashes.read_text()
        assert text.startswith("llama-rpc-tensor-hashes 1\n") and f" {name}\n" in text
        last = fleet.agents[1]
        assert (cache_dir(last) / name).exists()  # saved by the rpc-server: nobody held the file
        # Proof that the coordinator asks by the hash it is given instead of hashing the bytes: the
        # entry is there, but under another hash the rpc-server has none, so it gets the bytes again
        # (and saves them by their own hash: a server never files bytes under a name it was told).
        saved = len(saved_lines(last))
        hashes.write_text(text.replace(f" {name}\n", f" {FAKE}\n"))
        assert fleet.cli("stop", "gemma").returncode == 0
        wait_for(lambda: not fleet.ps(), 30, "gemma unloaded")
        assert raw_tokens(fleet) == stock_tokens  # a miss costs the transfer, never a wrong tensor
        assert len(saved_lines(last)) == saved + 1
        assert not (cache_dir(last) / FAKE).exists()


@pytest.mark.parametrize("mix", ["patched coordinator, stock rpc-servers", "stock coordinator, patched rpc-servers"])
def test_patched_and_stock_builds_work_together(tmp_path: Path, llama_cpp: Manifest, stock_llama_cpp: Manifest,
                                                test_model: Path, stock_tokens: str, mix: str) -> None:
    controller, agents = (llama_cpp, stock_llama_cpp) if mix.startswith("patched") else (stock_llama_cpp, llama_cpp)
    with running_fleet(tmp_path, controller, test_model, memory_limit=LIMITS, agent_llama_cpp=agents) as fleet:
        assert raw_tokens(fleet) == stock_tokens
        assert bool(fleet.ps()[0]["tensor_hashes"]) == (controller is llama_cpp)


def test_a_hash_file_that_does_not_match_the_model_is_ignored(tmp_path: Path, llama_cpp: Manifest,
                                                              test_model: Path, stock_tokens: str) -> None:
    name, _, _ = _output_entry(test_model)
    with running_fleet(tmp_path, llama_cpp, test_model, memory_limit=LIMITS) as fleet:
        assert raw_tokens(fleet) == stock_tokens
        saved = len(saved_lines(fleet.agents[1]))
        [hashes] = hash_files(fleet)
        lines = hashes.read_text().replace(f" {name}", f" {FAKE}").splitlines()
        size, mtime = lines[1].split()
        # As if the model had been replaced since the file was made (same size, another mtime).
        hashes.write_text("\n".join([lines[0], f"{size} {int(mtime) + 1}", *lines[2:]]) + "\n")
        assert fleet.cli("stop", "gemma").returncode == 0
        wait_for(lambda: not fleet.ps(), 30, "gemma unloaded")
        assert raw_tokens(fleet) == stock_tokens
        assert "does not describe" in coordinator_log(fleet)
        assert len(saved_lines(fleet.agents[1])) == saved  # hashed itself: the right hash, a cache hit


def _output_entry(test_model: Path) -> tuple[str, int, int]:
    """(cache entry name, file offset, size) of gemma's one tensor above the threshold."""
    header = read_gguf_header(test_model)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    offset = header.data_offset + embd.offset
    with test_model.open("rb") as handle:
        handle.seek(offset)
        data = handle.read(embd.n_bytes)
    return entry_name(_fnv(data)), offset, embd.n_bytes


def _fnv(data: bytes) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        return Fnv1a(Path(tmp)).hash(data)


def test_a_holder_with_a_patched_rpc_server_stages_a_reference_and_the_load_reads_it(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path, stock_tokens: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "gemma.gguf").symlink_to(test_model)
    name, offset, size = _output_entry(test_model)
    # The coordinator here: the load onto the holder crosses RPC (what the patches are for).
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, memory_limit=LIMITS,
                       agent_args=((), ("--models-dir", str(store))),
                       controller_args=("--coordinator", "controller")) as fleet:
        holder = fleet.agents[1]
        holders_confirmed(fleet)
        assert raw_tokens(fleet) == stock_tokens
        cache = cache_dir(holder)
        assert sorted(p.name for p in cache.iterdir()) == [f"{name}.ref"]  # no copy of the 170 MB tensor
        reference = (cache / f"{name}.ref").read_text().splitlines()
        assert reference[0] == "llama-rpc-ref 1" and reference[2].startswith(f"{offset} {size} ")
        assert saved_lines(holder) == []  # the rpc-server read the span itself: nothing came over the wire
        [loaded] = fleet.ps()
        node = loaded["prestage"]["nodes"][holder.address]
        assert (node["staged"], node["referenced"], node["bytes_written"]) == (1, 1, 0)
        assert loaded["prestaged_bytes"] == size


def test_a_stale_reference_is_a_cache_miss_and_a_good_one_a_hit(tmp_path: Path, llama_cpp: Manifest,
                                                                test_model: Path, stock_tokens: str) -> None:
    """The rpc-server's side of patch 0003, with no staging: references written by hand."""
    name, offset, size = _output_entry(test_model)
    stat = test_model.stat()
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, memory_limit=LIMITS) as fleet:
        last = fleet.agents[1]
        cache = cache_dir(last)
        cache.mkdir(parents=True, exist_ok=True)
        path = test_model.resolve()
        # As if the model file had been replaced since the reference was written (another mtime).
        (cache / f"{name}.ref").write_text(
            f"llama-rpc-ref 1\n{path}\n{offset} {size} {stat.st_size} {stat.st_mtime_ns + 1}\n")
        assert raw_tokens(fleet) == stock_tokens
        assert len(saved_lines(last)) == 1  # a miss: the bytes came over the network and were saved
        (cache / name).unlink()
        (cache / f"{name}.ref").write_text(
            f"llama-rpc-ref 1\n{path}\n{offset} {size} {stat.st_size} {stat.st_mtime_ns}\n")
        assert fleet.cli("stop", "gemma").returncode == 0
        wait_for(lambda: not fleet.ps(), 30, "gemma unloaded")
        before = len(saved_lines(last))
        assert raw_tokens(fleet) == stock_tokens
        assert len(saved_lines(last)) == before and not (cache / name).exists()  # a hit: served from the GGUF
