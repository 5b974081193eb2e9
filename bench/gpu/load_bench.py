"""Loads on a GPU (issues 15 and 16): llamafleet's load over RPC vs a local single-GPU load.

One run, side by side, on the lent GPU with the patched build (patches/llama.cpp):
- `local`: llama-server with the whole model on CUDA0, spawn → /health 200 (twice; the page
  cache is warm for both, as it is for every load after it);
- `llamafleet cold`: two agents on the one GPU, both holding the model file in `--models-dir`,
  their rpc caches empty: the first load pre-stages each share from the agent's own copy and the
  patched coordinator uses the controller's pre-computed tensor hashes (`load_duration` of an
  empty-prompt /api/generate);
- `llamafleet warm`: the same after an unload (the caches hold every entry);
- `hand warm, hashes` / `hand warm, stock hashing`: the same patched llama-server started by hand
  over the agents' rpc-servers (warm caches) with and without $LLAMA_RPC_TENSOR_HASHES: without
  the variable the patched binary takes stock llama.cpp's code path (the patch acts only when
  hashes are given), so this is the stock-vs-patched comparison; with the coordinator's CPU
  seconds at ready (/proc utime + stime).
Results: `load_ratio_vs_local` {cold, warm} in results.json, and a table in results.md.

    python3 bench/gpu/load_bench.py --llama-cpp INSTALL --model MODEL.gguf --out OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import (  # noqa: E402
    LOOPBACK,
    AgentSpec,
    BenchError,
    LlamaCpp,
    Proc,
    http_json,
    http_ok,
    llamafleet_bin,
    first_gpu,
    start,
    start_agent,
    start_llama_server,
    wait_until,
    write_token,
)

AGENTS = (AgentSpec("agent-a", 50351, 50352), AgentSpec("agent-b", 50361, 50362))
CONTROLLER_PORT = 11600
SERVER_PORT = 18281
MODEL_NAME = "bench"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def server_args(summary: dict[str, Any], ctx: int) -> list[str]:
    n_gpu_layers = int(summary["shape"]["n_layers"]) + 1
    return ["--n-gpu-layers", str(n_gpu_layers), "--ctx-size", str(ctx), "--parallel", "1", "--fit", "off",
            "--no-webui"]


# Lines of a llama-server log at -lv 4 that mark the phases of a load (each starts with a timestamp).
TIMELINE = ("load_model", "load_tensors", "pre-computed", "llama_context", "kv_cache", "graph_reserve", "warm",
            "model loaded", "init:", "n_ctx")


def hand_load(llama: LlamaCpp, model: Path, args: list[str], logdir: Path, name: str,
              env: dict[str, str] | None = None, timeline: bool = False) -> dict[str, Any]:
    server = start_llama_server(llama, name, model, SERVER_PORT, [*args, *(["-lv", "4"] if timeline else [])],
                                logdir, env)
    try:
        cpu = cpu_seconds(server.proc.popen.pid)
    finally:
        server.stop()
    log = server.proc.log.read_text(errors="replace")
    used = [line.strip() for line in log.splitlines() if "pre-computed" in line]
    result = {"load_s": round(server.load_s, 2), "cpu_s": round(cpu, 2), "hash_lines": used[-2:]}
    if timeline:
        # Where the time goes: the timestamped lines of each phase (first 80).
        result["timeline"] = [line.strip()[:200] for line in log.splitlines()
                              if line[:1].isdigit() and any(k in line for k in TIMELINE)][:80]
    return result


def generate(url: str, **extra: Any) -> dict[str, Any]:
    return http_json("POST", f"{url}/api/generate", {"model": MODEL_NAME, "prompt": "", "stream": False, **extra},
                     timeout_s=600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llamafleet-load-bench"))
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--memory-limit", default="6GiB")
    parser.add_argument("--setup-json", type=Path, default=None, help="gpu_bench.sh's setup.json, to include")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    summary = json.loads(Path(f"{args.model}.json").read_text())
    llama = LlamaCpp(args.llama_cpp)
    manifest = json.loads((args.llama_cpp / "manifest.json").read_text())
    shutil.rmtree(args.workdir, ignore_errors=True)
    logdir = args.workdir / "logs"
    logdir.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = first_gpu()
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": gpu,
        "llama_cpp_version": manifest.get("version"), "patches": manifest.get("patches"), "model": summary,
        "runs": {}, "errors": {},
    }
    if args.setup_json and args.setup_json.exists():
        setup = json.loads(args.setup_json.read_text())
        results["build_seconds"] = setup.get("build_seconds")
        results["nvml"] = setup.get("nvml")

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / "results.md").write_text(markdown(results))

    base = server_args(summary, args.ctx)
    local = [hand_load(llama, args.model, base, logdir, f"local-{i}", timeline=i == 1) for i in range(2)]
    results["runs"]["local"] = {"loads": local, "load_s": min(r["load_s"] for r in local)}
    print("local loads:", [r["load_s"] for r in local], flush=True)
    save()

    store = args.workdir / "store"
    store.mkdir()
    (store / f"{MODEL_NAME}.gguf").symlink_to(args.model)
    token = write_token(args.workdir / "token")
    agents: list[Proc] = []
    controller: Proc | None = None
    url = f"http://{LOOPBACK}:{CONTROLLER_PORT}"
    try:
        for spec in AGENTS:
            agents.append(start_agent(spec, llama, args.workdir, token, args.memory_limit, rpc_cache=True,
                                      logdir=logdir, extra_args=("--models-dir", str(store))))
        controller = start("controller", [
            llamafleet_bin("llamafleet"), "serve", "--listen", f"{LOOPBACK}:{CONTROLLER_PORT}", "--token-file",
            str(token), "--models-dir", str(store), "--llama-cpp", str(args.llama_cpp), "--state-dir",
            str(args.workdir / "controller-state"), "--default-ctx", str(args.ctx),
            # One slot, as the local and hand-started loads have: the same KV cache to allocate.
            "--parallel", "1",
            # This host runs the coordinator: the loads measured are over RPC onto the holders.
            "--coordinator", "controller",
            *[a for spec in AGENTS for a in ("--agent", spec.address)]], logdir)

        def holders() -> bool:
            if not http_ok(f"{url}/llamafleet/v1/nodes"):
                return False
            plan = http_json("POST", f"{url}/llamafleet/v1/plan", {"model": MODEL_NAME, "ctx": args.ctx})
            results["plan"] = plan
            # Every node of the plan holds the file (once all sides have hashed it).
            return bool(plan.get("fits")) and len(plan.get("holders", [])) == len({a["node"] for a in plan["assignments"]})

        held_s = wait_until(holders, "both agents confirmed as holders (sha256 on all sides)", 240, controller, 1.0)
        results["holders_confirmed_s"] = round(held_s, 1)
        plan = results["plan"]
        print(f"holders confirmed after {held_s:.1f} s; split {plan['tensor_split']}", flush=True)
        cold = generate(url)
        ps = http_json("GET", f"{url}/llamafleet/v1/ps", timeout_s=30)
        generate(url, keep_alive=0)
        wait_until(lambda: not http_json("GET", f"{url}/api/ps", timeout_s=30).get("models"), "unload", 60)
        warm = generate(url)
        generate(url, keep_alive=0)
        wait_until(lambda: not http_json("GET", f"{url}/api/ps", timeout_s=30).get("models"), "unload", 60)
        results["runs"]["llamafleet"] = {
            "load_cold_s": round(cold.get("load_duration", 0) / 1e9, 2),
            "load_warm_s": round(warm.get("load_duration", 0) / 1e9, 2), "ps_after_cold": ps,
        }
        print("llamafleet cold/warm:", results["runs"]["llamafleet"]["load_cold_s"],
              results["runs"]["llamafleet"]["load_warm_s"], flush=True)
        save()
        hashes = sorted((args.workdir / "controller-state" / "tensor-hashes").glob("*.txt"))
        endpoints = list(plan["backends"])
        rpc = ["--rpc", ",".join(endpoints), "--tensor-split", ",".join(str(n) for n in plan["tensor_split"]),
               "--device", ",".join(f"RPC{i}" for i in range(len(endpoints)))]
        env = {k: v for k, v in os.environ.items() if k != "LLAMA_RPC_TENSOR_HASHES"}
        results["runs"]["hand_stock_hashing"] = hand_load(llama, args.model, base + rpc, logdir, "hand-stock", env,
                                                          timeline=True)
        if hashes:
            results["runs"]["hand_hashes"] = hand_load(llama, args.model, base + rpc, logdir, "hand-hashes",
                                                       env | {"LLAMA_RPC_TENSOR_HASHES": str(hashes[-1])},
                                                       timeline=True)
        else:
            results["errors"]["hand_hashes"] = "the controller made no tensor hashes file"
    except BenchError as exc:
        results["errors"]["fleet"] = str(exc)
        print("failed:", exc, flush=True)
    finally:
        if controller is not None:
            results["controller_log_tail"] = controller.tail(40)
            controller.stop()
        for agent in agents:
            agent.stop()
    local_s = results["runs"]["local"]["load_s"]
    fleet_run = results["runs"].get("llamafleet", {})
    if fleet_run and local_s:
        results["load_ratio_vs_local"] = {"cold": round(fleet_run["load_cold_s"] / local_s, 2),
                                          "warm": round(fleet_run["load_warm_s"] / local_s, 2)}
    stock, hashed = results["runs"].get("hand_stock_hashing"), results["runs"].get("hand_hashes")
    if stock and hashed:
        results["coordinator_cpu_ratio_hashes_vs_stock"] = round(hashed["cpu_s"] / max(stock["cpu_s"], 0.01), 3)
    results["total_seconds"] = round(time.monotonic() - begin, 1)
    save()
    print(markdown(results))
    return 0


def markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    fleet_run = runs.get("llamafleet", {})
    lines = [f"# Loads on {results['device'].get('name')} ({results['date']})", "",
             f"Model: {results['model'].get('shape', {}).get('name')} Q8_0, "
             f"{results['model'].get('file_bytes', 0) / 1e9:.2f} GB; llama.cpp {results.get('llama_cpp_version')} "
             f"with patches {', '.join(p['name'] for p in results.get('patches') or []) or 'none'}.", "",
             "| load (spawn or request → ready) | s | coordinator CPU s |", "| --- | ---: | ---: |"]
    if "local" in runs:
        lines.append(f"| local, whole model on CUDA0 (best of 2) | {runs['local']['load_s']:.2f} | |")
    if fleet_run:
        lines.append(f"| llamafleet, 2 agents holding the file, caches empty (pre-staged during the load) | "
                     f"{fleet_run['load_cold_s']:.2f} | |")
        lines.append(f"| llamafleet, caches warm (a reload) | {fleet_run['load_warm_s']:.2f} | |")
    for key, label in (("hand_stock_hashing", "hand-started over the agents, warm, stock hashing"),
                       ("hand_hashes", "hand-started over the agents, warm, pre-computed hashes")):
        if key in runs:
            lines.append(f"| {label} | {runs[key]['load_s']:.2f} | {runs[key]['cpu_s']:.2f} |")
    if "load_ratio_vs_local" in results:
        r = results["load_ratio_vs_local"]
        lines += ["", f"load_ratio_vs_local: cold {r['cold']}, warm {r['warm']} (target ≤ 1.5)"]
    if "coordinator_cpu_ratio_hashes_vs_stock" in results:
        lines.append(f"coordinator CPU, pre-computed hashes ÷ stock hashing: {results['coordinator_cpu_ratio_hashes_vs_stock']}")
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
