"""A node back from a partition is watched again at once: its link cut for real, in a network
namespace the test makes itself (bench/netns.py, as tests/integration/faults/test_resume.py's
cut-link test), long enough for gRPC's own reconnect back-off to have grown."""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.netns import shaped_links
from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import AgentHost, Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
HEARTBEAT_S = 1.0
# Long enough for gRPC's reconnect back-off (1 s growing by 1.6 each attempt, with a 20 s floor
# on a connect attempt) to be past 20 s: the controller's watch was blind that long after a return.
PARTITION_S = 35.0
# One heartbeat to redial at most, then a connect and the agent's first status: the slack is for
# a loaded 2-core machine (measured here: see the README's "Failure behaviour").
BACK_WITHIN_S = HEARTBEAT_S + 2.0


def node(fleet: Fleet, address: str) -> dict[str, Any]:
    # The API itself rather than the CLI: a CLI process costs most of a second on 2 busy cores.
    with urllib.request.urlopen(f"{fleet.url}/llamafleet/v1/nodes", timeout=5) as reply:
        nodes: list[dict[str, Any]] = json.loads(reply.read())
    return next(n for n in nodes if n["address"] == address)


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                    reason="a cut link needs root and iproute2 (network namespaces the test makes itself)")
def test_a_node_back_from_a_partition_is_ready_within_a_heartbeat(tmp_path: Path, llama_cpp: Manifest,
                                                                   test_model: Path) -> None:
    with shaped_links(1) as links, running_fleet(
            tmp_path, llama_cpp, test_model, agents=1, heartbeat_s=HEARTBEAT_S,
            hosts=(AgentHost(links[0].worker_address, links[0].exec_prefix),)) as fleet:
        [link] = links
        address = fleet.agents[0].address
        link.set_up(False)
        wait_for(lambda: node(fleet, address)["state"] == "unreachable", 15, "the node unreachable")
        time.sleep(PARTITION_S)
        assert node(fleet, address)["state"] == "unreachable"
        link.set_up(True)
        returned = time.monotonic()
        wait_for(lambda: node(fleet, address)["state"] == "ready", 90, "the node ready again", interval_s=0.1)
        back_s = time.monotonic() - returned
        print(f"ready {back_s:.2f} s after the link came back (heartbeat {HEARTBEAT_S} s)")
        assert back_s <= BACK_WITHIN_S, f"the node was ready only {back_s:.1f} s after its return"
