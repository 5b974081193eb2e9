"""Decode speed with the coordinator on the worker vs on the controller's host (issue 22). Run by hand.

Two measurements side by side in one run, each alternating the two placements round by round:

1. **llamafleet, end to end**: three CPU agents on loopback that hold gemma-3-270m, capped so that
   the model needs two of them; the same controller, restarted with `--coordinator controller`
   and with `--coordinator auto` (which puts llama-server on the worker with the larger share).
   Decode tok/s from `/api/generate`'s eval_count / eval_duration.
2. **The same split by hand, over a slower link**: two rpc-servers, each behind a relay that adds
   `--delay-ms` each way (bench/delay_relay.py; these machines have no sch_netem), and llama-server
   started directly: once with both shares remote (`--device RPC0,RPC1`), once with the first
   share on its own CPU and only the second remote (what a worker coordinator does). Also at 0 ms.

Prints tok/s per placement and the ratio worker ÷ controller for each case.

    .venv/bin/python bench/coordinator_place.py [--rounds 3] [--tokens 64] [--delay-ms 5] [--json]

Needs LLAMAFLEET_TEST_LLAMA_CPP and LLAMAFLEET_TEST_MODEL (scripts/test.sh prepares both).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.delay_relay import RelayThread  # noqa: E402
from llamafleet.common.llamacpp.install import read_manifest  # noqa: E402
from llamafleet.common.llamacpp.probe import free_loopback_port  # noqa: E402
from tests.integration.agent.harness import wait_for  # noqa: E402
from tests.integration.controller.harness import Fleet, holder_stores, running_fleet  # noqa: E402

PROMPT = "Count from 1 to 500, one number after another: 1, 2, 3, 4,"
THREADS = "2"


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        doc: dict[str, Any] = json.loads(reply.read())
        return doc


def gateway_tok_s(fleet: Fleet, tokens: int) -> float:
    doc = post(f"{fleet.url}/api/generate", {"model": "gemma", "prompt": PROMPT, "raw": True, "stream": False,
                                             "options": {"num_predict": tokens, "temperature": 0}})
    return float(doc["eval_count"]) / (doc["eval_duration"] / 1e9)


def restart_controller(fleet: Fleet, mode: str) -> None:
    fleet.stop_controller()
    fleet.controller_args = ("--coordinator", mode)
    fleet.start_controller([a.address for a in fleet.agents])
    wait_for(lambda: all(n["state"] == "ready" for n in fleet.nodes()), 60, "every node ready")
    if mode != "controller":
        wait_for(lambda: json.loads(fleet.cli("plan", "gemma", "--json").stdout).get("coordinator") != "controller",
                 60, "holders known")


def fleet_case(tmp: Path, rounds: int, tokens: int) -> dict[str, Any]:
    manifest = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"]))
    model = Path(os.environ["LLAMAFLEET_TEST_MODEL"])
    results: dict[str, list[float]] = {"controller": [], "auto": []}
    placements: dict[str, Any] = {}
    with running_fleet(tmp / "fleet", manifest, model, agents=3,
                       agent_args=tuple((*store, "--rpc-threads", THREADS) for store in holder_stores(tmp, model, 3))) as fleet:
        for _ in range(rounds):
            for mode in ("controller", "auto"):
                restart_controller(fleet, mode)
                gateway_tok_s(fleet, 8)  # the load, and a warm-up
                [doc] = fleet.ps()
                placements[mode] = {"coordinator": doc["coordinator"], "backends": doc["backends"],
                                    "tensor_split": doc["tensor_split"]}
                results[mode].append(gateway_tok_s(fleet, tokens))
    controller, worker = statistics.median(results["controller"]), statistics.median(results["auto"])
    return {"controller_tok_s": controller, "worker_tok_s": worker, "ratio": worker / controller,
            "rounds": results, "placements": placements}


def _wait_healthy(port: int, proc: subprocess.Popen[bytes]) -> None:
    def healthy() -> bool:
        assert proc.poll() is None, "llama-server exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False
    wait_for(healthy, 120, "llama-server healthy")


def hand_case(tmp: Path, rounds: int, tokens: int, delay_ms: float) -> dict[str, Any]:
    manifest = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"]))
    model = os.environ["LLAMAFLEET_TEST_MODEL"]
    n_layers = 18  # gemma-3-270m
    first = n_layers // 2  # the worker's share: the leading layers
    rpc_ports = [free_loopback_port(), free_loopback_port()]
    servers = [start([manifest.rpc_server, "-H", "127.0.0.1", "-p", str(port), "-t", THREADS], tmp / f"rpc-{port}.log")
               for port in rpc_ports]
    relay_ports = [free_loopback_port(), free_loopback_port()]
    results: dict[str, list[float]] = {"controller": [], "worker": []}
    try:
        time.sleep(1.0)
        with RelayThread([(("127.0.0.1", r), ("127.0.0.1", p)) for r, p in zip(relay_ports, rpc_ports, strict=True)],
                         delay_ms / 1000):
            rpc = [f"127.0.0.1:{p}" for p in relay_ports]
            argv = {
                "controller": ["--rpc", ",".join(rpc), "--device", "RPC0,RPC1",
                               "--tensor-split", f"{first},{n_layers + 1 - first}", "--n-gpu-layers", str(n_layers + 1)],
                "worker": ["--rpc", rpc[1], "--device", "RPC0", "--tensor-split", str(n_layers + 1 - first),
                           "--n-gpu-layers", str(n_layers + 1 - first)],
            }
            for _ in range(rounds):
                for mode, placement in argv.items():
                    port = free_loopback_port()
                    proc = start([manifest.llama_server, "--model", model, *placement, "--host", "127.0.0.1",
                                  "--port", str(port), "--ctx-size", "1024", "--parallel", "1", "--fit", "off",
                                  "-t", THREADS, "--no-webui"], tmp / f"hand-{mode}.log")
                    try:
                        _wait_healthy(port, proc)
                        body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "cache_prompt": False}
                        post(f"http://127.0.0.1:{port}/completion", body | {"n_predict": 4})
                        doc = post(f"http://127.0.0.1:{port}/completion", body)
                        results[mode].append(float(doc["timings"]["predicted_per_second"]))
                    finally:
                        stop(proc)
    finally:
        for server in servers:
            stop(server)
    controller, worker = statistics.median(results["controller"]), statistics.median(results["worker"])
    return {"delay_ms": delay_ms, "controller_tok_s": controller, "worker_tok_s": worker, "ratio": worker / controller,
            "rounds": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lf-coordinator-place-") as folder:
        tmp = Path(folder)
        report: dict[str, Any] = {
            "fleet": fleet_case(tmp, args.rounds, args.tokens),
            "hand": [hand_case(tmp, args.rounds, args.tokens, 0.0), hand_case(tmp, args.rounds, args.tokens, args.delay_ms)],
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    f = report["fleet"]
    print(f"llamafleet, 3 CPU agents: coordinator on the controller {f['controller_tok_s']:.1f} tok/s, "
          f"on the worker {f['worker_tok_s']:.1f} tok/s: ratio {f['ratio']:.2f}  ({f['placements']})")
    for h in report["hand"]:
        print(f"by hand, {h['delay_ms']:g} ms each way: both shares remote {h['controller_tok_s']:.1f} tok/s, "
              f"first share local {h['worker_tok_s']:.1f} tok/s: ratio {h['ratio']:.2f}")


if __name__ == "__main__":
    main()
