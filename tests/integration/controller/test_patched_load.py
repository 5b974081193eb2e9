"""The llama.cpp patch set (issue 16) in a real fleet: a patched coordinator uses the controller's
pre-computed tensor hashes, answers with the tokens a stock one gives, and works with stock
rpc-servers (and a stock coordinator with patched ones): the RPC protocol does not change.

Gemma's only tensor above llama.cpp's 10 MiB hash threshold is the output copy of its tied token
embeddings (170 MB, on the last rpc-server): the one tensor a patched coordinator sets by its
pre-computed hash."""

from __future__ import annotations

from pathlib import Path

import ollama
import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.patches import PRECOMPUTED_HASHES_PATCH
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
LIMITS = ("260MiB", "300MiB")
GREEDY = {"temperature": 0, "seed": 1, "num_predict": 16}
PROMPT = "The capital of France is a city where"
USED = "tensors set through pre-computed RPC hashes"


def raw_tokens(fleet: Fleet) -> str:
    reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt=PROMPT, raw=True, options=GREEDY)
    assert reply.eval_count == GREEDY["num_predict"]
    return reply.response


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
        assert USED not in coordinator_log(fleet)
        assert not hash_files(fleet), "a stock coordinator gets no hashes"
    return tokens


def test_the_builds_under_test_are_what_they_say(llama_cpp: Manifest, stock_llama_cpp: Manifest) -> None:
    assert PRECOMPUTED_HASHES_PATCH in llama_cpp.patch_names
    assert stock_llama_cpp.patches == []
    assert llama_cpp.rpc_protocol_version == stock_llama_cpp.rpc_protocol_version


def test_a_patched_coordinator_uses_the_hashes_and_gives_the_stock_tokens(tmp_path: Path, llama_cpp: Manifest,
                                                                           test_model: Path, stock_tokens: str) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, memory_limit=LIMITS) as fleet:
        assert raw_tokens(fleet) == stock_tokens
        log = coordinator_log(fleet)
        assert "1 pre-computed tensor hashes from" in log, log[-3000:]
        assert f"1 {USED}" in log
        [hashes] = hash_files(fleet)
        assert hashes.read_text().startswith("llama-rpc-tensor-hashes 1\n")


@pytest.mark.parametrize("mix", ["patched coordinator, stock rpc-servers", "stock coordinator, patched rpc-servers"])
def test_patched_and_stock_builds_work_together(tmp_path: Path, llama_cpp: Manifest, stock_llama_cpp: Manifest,
                                                test_model: Path, stock_tokens: str, mix: str) -> None:
    controller, agents = (llama_cpp, stock_llama_cpp) if mix.startswith("patched") else (stock_llama_cpp, llama_cpp)
    with running_fleet(tmp_path, controller, test_model, memory_limit=LIMITS, agent_llama_cpp=agents) as fleet:
        assert raw_tokens(fleet) == stock_tokens
        assert (f"1 {USED}" in coordinator_log(fleet)) == (controller is llama_cpp)


def test_a_hash_file_that_does_not_match_the_model_is_ignored(tmp_path: Path, llama_cpp: Manifest,
                                                              test_model: Path, stock_tokens: str) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, memory_limit=LIMITS) as fleet:
        assert raw_tokens(fleet) == stock_tokens
        [hashes] = hash_files(fleet)
        lines = hashes.read_text().splitlines()
        size, mtime = lines[1].split()
        # As if the model had been replaced since the file was made (same size, another mtime).
        hashes.write_text("\n".join([lines[0], f"{size} {int(mtime) + 1}", *lines[2:]]) + "\n")
        assert fleet.cli("stop", "gemma").returncode == 0
        wait_for(lambda: not fleet.ps(), 30, "gemma unloaded")
        assert raw_tokens(fleet) == stock_tokens
        log = coordinator_log(fleet)
        assert "does not describe" in log and USED not in log
