"""Workers keep the weights (issue 15): a real agent indexes its models dir, the controller
shows who holds what and places the model on the node that holds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llamafleet.common.llamacpp.install import Manifest
from llamafleet.proto.v1 import agent_pb2 as pb
from tests.integration.agent.harness import running_agent, wait_for
from tests.integration.controller.harness import running_fleet

pytestmark = pytest.mark.integration
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_the_agent_reports_its_models_by_sha256_and_remembers_them(tmp_path: Path, llama_cpp: Manifest,
                                                                   test_model: Path) -> None:
    store = tmp_path / "store"
    (store / "gemma3").mkdir(parents=True)
    (store / "gemma3" / "270m.gguf").symlink_to(test_model)
    with running_agent(tmp_path / "agent", llama_cpp.install_dir, extra_args=("--models-dir", str(store))) as agent:
        def hashed() -> pb.ModelFile | None:
            models = agent.status().models
            return models[0] if models and models[0].state == pb.MODEL_FILE_STATE_READY else None

        model = wait_for(hashed, 60, "the test model's sha256")
        assert (model.name, model.sha256, model.size_bytes) == ("gemma3/270m", GEMMA_SHA256, test_model.stat().st_size)
        status = agent.status()
        assert status.models_dir == str(store) and status.models_omitted == 0
        # A restart answers from the digest cache: ready in the first status, not after a rehash.
        agent.proc.terminate()
        agent.proc.wait(timeout=15)
        agent.start_again()
        first = agent.status().models
        assert [(m.state, m.sha256) for m in first] == [(pb.MODEL_FILE_STATE_READY, GEMMA_SHA256)]


def test_nodes_show_the_holder_and_the_plan_prefers_it(tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "gemma.gguf").symlink_to(test_model)
    # Either node alone holds gemma; the one without the file has more room, so memory alone
    # would choose it: only the holder preference puts the model on agent 1.
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, memory_limit=("900MiB", "700MiB"),
                       agent_args=((), ("--models-dir", str(store)))) as fleet:
        holder, other = fleet.agents[1], fleet.agents[0]

        def listed() -> dict[str, object] | None:
            models = fleet.node(holder.address)["models"]
            return models[0] if models and models[0]["state"] == "ready" else None

        model = wait_for(listed, 60, "nodes --json to list the holder's model")
        assert model["sha256"] == GEMMA_SHA256 and model["name"] == "gemma"
        assert fleet.node(other.address)["models"] == []
        assert "model gemma (" in fleet.cli("nodes").stdout

        def planned() -> dict[str, Any] | None:
            result = fleet.cli("plan", "gemma", "--ctx", "2048", "--json")
            assert result.returncode == 0, result.stderr
            doc = json.loads(result.stdout)
            return doc if doc["holders"] else None  # the controller hashes its own copy first

        plan = wait_for(planned, 60, "a plan with the holder confirmed", interval_s=0.5)
        assert [a["node"] for a in plan["assignments"]] == [holder.address] and plan["holders"] == [holder.address]
        # The holder computes the whole model itself: its coordinator runs there, with no rpc-server.
        assert plan["coordinator"] == holder.address and plan["backends"] == []
        assert "1 node(s) hold the model (sha256 a5fd3b62230a" in plan["holder_reason"]
        assert "preferred over nodes with more room" in plan["holder_reason"]
        text = fleet.cli("plan", "gemma", "--ctx", "2048").stdout
        assert "holds the model" in text and "holders: 1 node(s) hold the model" in text
