"""A worker whose rpc-server speaks another RPC protocol major: left out with that reason, no crash loop."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import ollama
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.agent.harness import running_agent, wait_for
from tests.integration.controller.harness import running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
# Speaks the banner of an older llama.cpp and listens; it never serves a tensor.
OLD_RPC_SERVER = textwrap.dedent("""\
    #!{python}
    import socket, sys, time
    host = sys.argv[sys.argv.index("-H") + 1]
    port = int(sys.argv[sys.argv.index("-p") + 1])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen()
    print("Starting RPC server v6.1.0")
    print(f"  endpoint       : {{host}}:{{port}}")
    print("  local cache    : n/a")
    print("Devices:")
    print("  CPU: old build (8192 MiB, 8192 MiB free)")
    print("  transport      : TCP", flush=True)
    while True:
        time.sleep(60)
""")


def test_a_backend_of_another_protocol_major_is_excluded_and_never_restarted(tmp_path: Path, llama_cpp: Manifest,
                                                                            test_model: Path) -> None:
    old = tmp_path / "old-llama.cpp" / "bin"
    old.mkdir(parents=True)
    (old / "ggml-rpc-server").write_text(OLD_RPC_SERVER.format(python=sys.executable))
    (old / "ggml-rpc-server").chmod(0o755)
    (old / "llama-server").symlink_to(llama_cpp.llama_server)
    with running_fleet(tmp_path / "fleet", llama_cpp, test_model, agents=2) as fleet, \
            running_agent(tmp_path / "old-agent", old.parent, rpc_host="127.0.0.9", token_file=fleet.token_file,
                          extra_args=("--memory-limit", "4GiB")) as skewed:
        assert fleet.cli("node", "add", skewed.address).returncode == 0
        wait_for(lambda: fleet.node(skewed.address)["state"] == "ready", 20, "the skewed node ready")
        plan = json.loads(fleet.cli("plan", "gemma", "--json").stdout)
        assert "RPC protocol 6.1.0 differs from the coordinator's 7.0.0" in plan["excluded"][skewed.address]
        assert skewed.rpc_endpoint not in plan["backends"]
        # The roomiest node by far, yet the model is served by the two that speak our protocol.
        reply = ollama.Client(host=fleet.url).generate(model="gemma", prompt="hi", options={"num_predict": 4})
        assert reply.done
        [loaded] = json.loads(fleet.cli("ps", "--json").stdout)
        assert skewed.rpc_endpoint not in loaded["backends"]
        time.sleep(2)
        [still] = json.loads(fleet.cli("ps", "--json").stdout)
        assert skewed.rpc().restarts == 0 and still["restarts"] == 0 and still["pid"] == loaded["pid"]
