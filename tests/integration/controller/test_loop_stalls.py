"""Nothing blocks the controller's event loop while coordinators start and two models alternate."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import ollama
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = pytest.mark.integration
# The target is 50 ms. Measured (five runs, 2 Dec): 13–29 ms on the quiet machine, 24 ms
# with two busy processes beside it; only with five sessions building and testing at once (load 9)
# did one run pass 50 ms (50 and 58 ms). What the quiet and the busy machine do not show is the
# machine's load, not a blocking call of ours, so 50 ms here would fail by the neighbours. The
# bound is twice the target, for a loaded 2-core machine: the defects this catches were 1.5 s
# (the build's version probe on the loop) and ~0.1 s per header read.
MAX_STALL_S = 0.1


def longest_stall(fleet: Fleet) -> float:
    with urllib.request.urlopen(f"{fleet.url}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(r"^llamafleet_event_loop_stall_seconds_max (\S+)$", text, re.MULTILINE)
    assert match, "the controller does not measure its event loop's stalls"
    return float(match.group(1))


def test_the_loop_never_stalls_while_coordinators_start_and_two_models_alternate(
        tmp_path: Path, llama_cpp: Manifest, test_model: Path) -> None:
    with running_fleet(tmp_path, llama_cpp, test_model, agents=1, memory_limit="2GiB",
                       model_names=("gemma", "gemma-copy")) as fleet:
        client = ollama.Client(host=fleet.url, timeout=60)
        before = longest_stall(fleet)
        for model in ("gemma", "gemma-copy", "gemma", "gemma-copy"):
            # keep_alive 0: every request starts its coordinator again (the build is adopted anew each time).
            reply = client.generate(model=model, prompt="Once upon a time", raw=True, keep_alive=0,
                                    options={"temperature": 0, "num_predict": 4})
            assert reply.eval_count == 4
        stall = longest_stall(fleet)
        assert stall <= MAX_STALL_S, f"the event loop stalled for {stall * 1000:.0f} ms (at start: {before * 1000:.0f} ms)"
