"""The reader and the plan, checked against the real gemma-3-270m and real llama.cpp.

- field values and tensor sizes equal what gguf-py's GGUFReader (the oracle, ~17 s) reads;
- a plan over two real rpc-servers, handed to a real llama-server, puts the bytes where the
  plan says: llama.cpp's own memory breakdown per device matches the plan's weights and KV.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import pytest

from llamafleet.common.llamacpp.banner import RpcBanner
from llamafleet.common.llamacpp.install import Manifest
from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.common.process import line_buffered, spawn_group, stop_group
from llamafleet.controller.estimate import estimate_memory
from llamafleet.controller.gguf import read_gguf_header
from llamafleet.controller.placement.nodes import DeviceView, NodeView
from llamafleet.controller.placement.plan import Headroom, make_plan
from tests.unit.controller.test_gguf import compare_with_oracle

pytestmark = pytest.mark.integration
MiB = 2**20
# "load_tensors: RPC0[127.0.0.2:5005] model buffer size = 35.17 MiB", and KV and compute alike.
_BUFFER = re.compile(r"RPC\d+\[([^\]]+)\] (model|KV|compute) buffer size =\s*([\d.]+) MiB")


def test_gemma_header_matches_the_oracle(test_model: Path) -> None:
    compare_with_oracle(test_model)


def test_llama_cpp_puts_the_bytes_where_the_plan_says(llama_cpp: Manifest, test_model: Path) -> None:
    header = read_gguf_header(test_model)
    estimate = estimate_memory(header, ctx=2048, parallel=1)
    hosts = ["127.0.0.2", "127.0.0.3"]
    ports = [free_loopback_port() for _ in hosts]
    # Two CPU workers that each advertise less than the model: the plan must use both.
    nodes = [NodeView(f"{h}:1", "ready", "running", f"{h}:{p}", llama_cpp.rpc_protocol_version,
                      (DeviceView("CPU", 260 * MiB, 260 * MiB),)) for h, p in zip(hosts, ports)]
    plan = make_plan("gemma", estimate, nodes, llama_cpp.rpc_protocol_version, Headroom(fraction=0.0))
    assert plan.fits and len(plan.backends) == 2, plan.reason
    servers = [spawn_group(line_buffered([llama_cpp.rpc_server, "-H", h, "-p", str(p)])) for h, p in zip(hosts, ports)]
    coordinator = None
    try:
        for server in servers:
            banner = RpcBanner()
            while not banner.complete:
                line = server.stdout.readline()  # type: ignore[union-attr]
                assert line, "rpc-server exited before its banner"
                banner.feed(line.decode())
        http_port = free_loopback_port()
        coordinator = spawn_group([
            llama_cpp.llama_server, "-m", str(test_model), "--rpc", ",".join(plan.backends),
            "--tensor-split", ",".join(map(str, plan.tensor_split)), "-ngl", "999", "-c", "2048", "-np", "1",
            "--fit", "off", "--host", "127.0.0.1", "--port", str(http_port), "-lv", "4",
        ])
        deadline = time.monotonic() + 120
        output: list[str] = []
        while time.monotonic() < deadline:
            line = coordinator.stdout.readline()  # type: ignore[union-attr]
            assert line, "llama-server exited:\n" + "".join(output[-30:])
            output.append(line.decode(errors="replace"))
            if "listening on" in output[-1] or "server is listening" in output[-1]:
                break
        buffers: dict[tuple[str, str], float] = {}
        for line in output:
            if match := _BUFFER.search(line):
                key = (match.group(1), match.group(2))
                buffers[key] = buffers.get(key, 0.0) + float(match.group(3))
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=10) as reply:
            assert reply.status == 200
    finally:
        if coordinator is not None:
            stop_group(coordinator)
        for server in servers:
            stop_group(server)
    assert {endpoint for endpoint, _ in buffers} == set(plan.backends), "".join(output[-40:])
    for a in plan.assignments:
        print(f"{a.endpoint}: plan weights {(a.weight_bytes + a.output_bytes) / MiB:.2f} MiB, KV {a.kv_bytes / MiB:.2f}, "
              f"compute {a.compute_bytes / MiB:.2f}; llama.cpp model {buffers[(a.endpoint, 'model')]:.2f}, "
              f"KV {buffers.get((a.endpoint, 'KV'), 0.0):.2f}, compute {buffers[(a.endpoint, 'compute')]:.2f}")
        assert abs(buffers[(a.endpoint, "model")] - (a.weight_bytes + a.output_bytes) / MiB) <= 1.0, (a, buffers)
        # gemma-3 keeps a small sliding-window cache for most layers: the plan's KV is an upper bound.
        assert buffers.get((a.endpoint, "KV"), 0.0) <= a.kv_bytes / MiB + 0.5, (a, buffers)
        assert buffers[(a.endpoint, "compute")] <= a.compute_bytes / MiB, (a, buffers)
