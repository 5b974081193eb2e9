"""The controller's state dir on a full disk: a clear 503, loaded models keep answering, no spin, it heals."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.controller.disk import fill, small_tmpfs
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration


def generate(fleet: Fleet, model: str) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": model, "prompt": "Once upon a time", "raw": True, "stream": False,
                       "options": {"temperature": 0, "num_predict": 4}}).encode()
    request = urllib.request.Request(f"{fleet.url}/api/generate", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_full_state_disk_refuses_new_loads_clearly_and_heals(tmp_path: Path, llama_cpp: Manifest,
                                                               test_model: Path) -> None:
    with small_tmpfs(tmp_path / "controller", "16m") as state, \
            running_fleet(tmp_path, llama_cpp, test_model, agents=1, memory_limit="2GiB",
                          model_names=("gemma", "gemma-copy")) as fleet:
        assert generate(fleet, "gemma")[0] == 200
        filler = fill(state)
        status, body = generate(fleet, "gemma-copy")
        assert status == 503 and "disk is full" in str(body["error"]), body
        assert generate(fleet, "gemma")[0] == 200  # the loaded model keeps answering
        assert fleet.controller is not None
        before = cpu_seconds(fleet.controller.pid)
        time.sleep(3)
        assert cpu_seconds(fleet.controller.pid) - before < 0.5  # idle: nothing spins on the full disk
        filler.unlink()
        assert generate(fleet, "gemma-copy")[0] == 200  # space is back: it loads
