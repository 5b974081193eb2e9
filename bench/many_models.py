"""Many users and many models on one fleet, measured side by side in one run.

1. Aggregate decode: 1, 4 and 8 concurrent streams through the gateway to one model whose
   coordinator got its slots from `--parallel auto`, each as a ratio to one stream. (The GPU
   hardware gives 2.7x at 8 streams over RPC; on 2 CPU cores the cores are the ceiling.)
2. Two models alternating every request (two names of one GGUF, as a chat UI with a title
   model does): the second model's time to first token, p50/p99 over the rounds, against its
   own load time. Target: p99 <= load + 1 s (before one rpc-server per model: minutes).
The first is run with llama-server's prompt cache off (our default) and at its default.

    .venv/bin/python bench/many_models.py [--tokens 48] [--rounds 10]

Uses $LLAMAFLEET_TEST_LLAMA_CPP and $LLAMAFLEET_TEST_MODEL (scripts/test.sh prepares both).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamafleet.common.llamacpp.install import read_manifest  # noqa: E402
from tests.integration.controller.harness import Fleet, running_fleet  # noqa: E402

PROMPT = "Tell me a long story about a lighthouse keeper and the storm that changed his life."


def generate(fleet: Fleet, model: str, tokens: int) -> tuple[float, int, float]:
    """One streamed /api/generate: (seconds to the first piece, tokens, seconds for the whole)."""
    url = urllib.parse.urlsplit(fleet.url)
    assert url.hostname is not None, url
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    started = time.perf_counter()
    body = {"model": model, "prompt": PROMPT, "raw": True, "stream": True,
            "options": {"num_predict": tokens, "temperature": 0, "seed": 1}}
    conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200, reply.read()
    first = 0.0
    count = 0
    for raw in reply:
        doc = json.loads(raw)
        first = first or time.perf_counter() - started
        if doc.get("done"):
            count = doc.get("eval_count", 0)
    conn.close()
    return first, count, time.perf_counter() - started


def aggregate(fleet: Fleet, streams: int, tokens: int) -> float:
    """Tokens per second over all streams, from the first start to the last end."""
    started = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: generate(fleet, "gemma", tokens), range(streams)))
    return sum(r[1] for r in results) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    llama_cpp = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"]))
    model = Path(os.environ["LLAMAFLEET_TEST_MODEL"])
    with tempfile.TemporaryDirectory() as tmp:
        # With llama-server's prompt cache off (ours) and at its own default (8 GiB), which saves
        # every idle slot's KV to host RAM when a request starts: over RPC a read from the workers.
        for cache_mib in (0, 8192):
            print(f"== aggregate decode through the gateway, --parallel auto, 2 CPU backends, "
                  f"--prompt-cache-mib {cache_mib}")
            with running_fleet(Path(tmp) / f"slots-{cache_mib}", llama_cpp, model, agents=2, memory_limit="1GiB",
                               controller_args=("--prompt-cache-mib", str(cache_mib))) as fleet:
                generate(fleet, "gemma", 4)  # loaded before anything is timed
                [loaded] = json.loads(fleet.cli("ps", "--json").stdout)
                print(f"slots chosen by --parallel auto: {loaded['parallel']}")
                rates = {n: aggregate(fleet, n, args.tokens) for n in (1, 4, 8)}
                for n, rate in rates.items():
                    print(f"{n} stream(s): {rate:6.1f} tok/s aggregate, {rate / rates[1]:.2f}x one stream")

        print("== two models alternating every request (two names of one GGUF)")
        with running_fleet(Path(tmp) / "two", llama_cpp, model, agents=2, memory_limit=("2GiB", "400MiB"),
                           model_names=("gemma", "gemma-copy")) as fleet:
            generate(fleet, "gemma", 4)
            first_tokens: list[float] = []
            load_s = 0.0
            for i in range(args.rounds):
                generate(fleet, "gemma", 8)
                ttft, _, _ = generate(fleet, "gemma-copy", 8)
                if i == 0:
                    load_s = next(d for d in json.loads(fleet.cli("ps", "--json").stdout)
                                  if d["model"] == "gemma-copy:latest")["load_duration_s"]
                first_tokens.append(ttft)
            ordered = sorted(first_tokens)
            p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
            print(f"second model: load {load_s:.2f}s; first token p50 {statistics.median(first_tokens):.2f}s, "
                  f"p99 {p99:.2f}s (first round, with its load, {first_tokens[0]:.2f}s); "
                  f"target p99 <= load + 1 s = {load_s + 1:.2f}s: {'met' if p99 <= load_s + 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
