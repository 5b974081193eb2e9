"""What llamafleet costs on top of llama.cpp, measured side by side in one run.

1. Gateway overhead: `/api/chat` streamed through the gateway vs the same coordinator's
   `/v1/chat/completions` called directly, alternating request by request. Targets: tokens/s
   ratio >= 0.98, added time-to-first-token <= 5 ms (medians).
2. Orchestration tax: the llamafleet-placed 2-backend deployment (through the gateway) vs a
   hand-started `llama-server` with the very same flags over the same rpc-servers (directly),
   alternating phases (the rpc-servers serve one coordinator at a time). Target >= 0.97.
3. Reload: coordinator start to ready with the agents' rpc tensor cache cold vs warm.

    .venv/bin/python bench/gateway.py [--rounds 12] [--tokens 64]

Uses $LLAMAFLEET_TEST_LLAMA_CPP and $LLAMAFLEET_TEST_MODEL (scripts/test.sh prepares both).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamafleet.common.llamacpp.install import read_manifest  # noqa: E402
from llamafleet.common.llamacpp.probe import free_loopback_port  # noqa: E402
from llamafleet.common.process import spawn_group, stop_group  # noqa: E402
from tests.integration.agent.harness import wait_for  # noqa: E402
from tests.integration.controller.harness import Fleet, running_fleet  # noqa: E402

MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def stream(url: str, path: str, body: dict) -> tuple[float, float, int]:
    """POST a streaming request; (time to first content, content tokens per second after it, pieces)."""
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None, parsed
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200, reply.read()
    first = last = 0.0
    pieces = 0
    for raw in reply:
        line = raw.strip()
        if not line or line == b"data: [DONE]":
            continue
        doc = json.loads(line.removeprefix(b"data: "))
        text = (doc.get("message") or {}).get("content") or "".join(
            (c.get("delta") or {}).get("content") or "" for c in doc.get("choices") or [])
        if text:
            last = time.perf_counter()
            first = first or last
            pieces += 1
    conn.close()
    rate = (pieces - 1) / (last - first) if pieces > 1 and last > first else 0.0
    return (first - started) * 1000, rate, pieces


def via_gateway(fleet: Fleet, tokens: int) -> tuple[float, float, int]:
    return stream(fleet.url, "/api/chat", {"model": "gemma", "messages": MESSAGES, "stream": True,
                                           "options": {"num_predict": tokens, "temperature": 0, "seed": 1}})


def direct(url: str, tokens: int) -> tuple[float, float, int]:
    return stream(url, "/v1/chat/completions", {"messages": MESSAGES, "stream": True, "max_tokens": tokens,
                                                "temperature": 0, "seed": 1})


def ps(fleet: Fleet) -> list[dict]:
    return json.loads(fleet.cli("ps", "--json").stdout)


def load(fleet: Fleet) -> float:
    reply = json.loads(subprocess.run(
        ["curl", "-s", f"{fleet.url}/api/generate", "-d", json.dumps({"model": "gemma", "prompt": ""})],
        capture_output=True, text=True, check=True).stdout)
    return reply["load_duration"] / 1e9


def report(name: str, a: list[tuple[float, float, int]], b: list[tuple[float, float, int]], a_name: str,
           b_name: str) -> dict:
    ttft_a, ttft_b = statistics.median(x[0] for x in a), statistics.median(x[0] for x in b)
    rate_a, rate_b = statistics.median(x[1] for x in a), statistics.median(x[1] for x in b)
    print(f"{name}: {a_name} {rate_a:.1f} tok/s, TTFT {ttft_a:.1f} ms | {b_name} {rate_b:.1f} tok/s, "
          f"TTFT {ttft_b:.1f} ms | tokens/s ratio {rate_a / rate_b:.3f}, TTFT added {ttft_a - ttft_b:+.1f} ms "
          f"(medians of {len(a)})")
    return {"ratio": rate_a / rate_b, "ttft_added_ms": ttft_a - ttft_b}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    manifest = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"]))
    model = Path(os.environ["LLAMAFLEET_TEST_MODEL"])
    with tempfile.TemporaryDirectory() as tmp, running_fleet(Path(tmp), manifest, model, agents=2) as fleet:
        print(f"{len(fleet.agents)} agents (CPU, 260 MiB each), gemma-3-270m Q4_K_M, {args.tokens} tokens per request")
        load(fleet)
        [doc] = ps(fleet)
        url = doc["url"]
        print(f"coordinator over {', '.join(doc['backends'])} (split {doc['tensor_split']})")
        via_gateway(fleet, args.tokens), direct(url, args.tokens)  # warm both paths
        gateway, plain = [], []
        for _ in range(args.rounds):
            gateway.append(via_gateway(fleet, args.tokens))
            plain.append(direct(url, args.tokens))
        report("1. gateway overhead", gateway, plain, "gateway", "llama-server directly")

        argv = Path(doc["log"]).read_text().splitlines()[0].removeprefix("# ").split()
        argv[0] = manifest.llama_server
        placed, by_hand = [], []
        for _ in range(2):
            by_hand_port = free_loopback_port()
            argv[argv.index("--port") + 1] = str(by_hand_port)
            fleet.cli("stop", "gemma")
            proc = spawn_group(argv)
            try:
                health = ["curl", "-sf", f"http://127.0.0.1:{by_hand_port}/health"]
                wait_for(lambda: subprocess.run(health, capture_output=True).returncode == 0, 120,  # noqa: B023
                         "hand-started llama-server")
                direct(f"http://127.0.0.1:{by_hand_port}", args.tokens)
                by_hand += [direct(f"http://127.0.0.1:{by_hand_port}", args.tokens) for _ in range(args.rounds // 2)]
            finally:
                stop_group(proc)
            load(fleet)
            via_gateway(fleet, args.tokens)
            placed += [via_gateway(fleet, args.tokens) for _ in range(args.rounds // 2)]
        report("2. orchestration tax", placed, by_hand, "llamafleet-placed", "hand-started llama-server --rpc")

        cold, warm = [], []
        for _ in range(3):
            fleet.cli("stop", "gemma")
            for agent in fleet.agents:
                cache = agent.state_dir.parent / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                cache.mkdir()
            cold.append(load(fleet))
            fleet.cli("stop", "gemma")
            warm.append(load(fleet))
        c, w = statistics.median(cold), statistics.median(warm)
        print(f"3. reload to ready: rpc cache cold {c:.2f}s, warm {w:.2f}s (medians of 3): warm/cold {w / c:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
