"""One model, four ways, on the GPU(s) of one machine: single-GPU, hand-started RPC split, llamafleet.

From one run, prints and writes (JSON + a markdown table, with the device and the date):

- decode tokens/s and prompt-processing tokens/s (a 512-token prompt) of
  1. `llama-server` alone on the local GPU (`-ngl 999`);
  2. a hand-started `llama-server --rpc A,B --device RPC0,RPC1 --tensor-split X,Y` over two bare
     `ggml-rpc-server`s, with the flags llamafleet's coordinator uses and the split its planner
     chose for the same model and memory caps;
  3. the same over the two agents' rpc-servers (with their tensor cache);
  4. llamafleet: two agents (`--memory-limit` caps each below the model's size, so placement
     needs both), the controller, and the Ollama-compatible gateway (`POST /api/generate`, raw
     prompt); run only when `llamafleet.controller.gateway` can be imported;
  5. as 2 without `--device`: llama.cpp's default device list, which adds the coordinator host's
     own GPU (at split 0) to the two RPC devices;
- the load time of the RPC split with no tensor cache, with the agents' `--rpc-cache` cold (empty)
  and warm (a second load of the same model);
- the decode roofline: measured GPU memory bandwidth ÷ bytes of weights read per token, and each
  decode result as a fraction of it (also against the datasheet bandwidth).

Speeds are llama-server's own `timings` (predicted_per_second, prompt_per_second) from /completion,
greedy (temperature 0), seed 1, `ignore_eos`, no prompt cache; each the median of `--reps` runs
after one warm-up. Stages that would overrun `--deadline-s` are skipped and reported as not run.

    python bench/gpu/split_bench.py --llama-cpp DIR --model M.gguf --out DIR [--nvml nvml.json]

Nothing here is imported by the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet import (
    LOOPBACK,
    AgentSpec,
    BenchError,
    LlamaCpp,
    Proc,
    agent_status,
    complete,
    http_json,
    http_ok,
    llamafleet_bin,
    median,
    first_gpu,
    run_cli,
    start,
    start_agent,
    start_llama_server,
    start_rpc_server,
    wait_until,
    words_prompt,
    write_token,
)

# Datasheet memory bandwidth (bytes/s) by the name nvidia-smi prints.
DATASHEET_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}
AGENTS = (AgentSpec("agent-a", 50151, 50152), AgentSpec("agent-b", 50161, 50162))
PLAIN_RPC_PORTS = (50252, 50262)
CONTROLLER_PORT = 11500
SERVER_PORT = 18181
MODEL_NAME = "bench"
# Rough seconds each stage needs (8B Q8_0 on an H100), for the deadline check.
STAGE_COST_S = {"membw": 20, "fleet": 30, "single": 30, "rpc": 45, "cache": 50, "llamafleet": 90, "rpc_local_gpu": 40,
                "rpc_one_local": 40, "llamafleet_worker": 120}
# Lines of llama-server's log (at -lv 4) that say where the model went and how much memory it took.
PLACEMENT_MARKERS = ("load_tensors:", "buffer size", "memory_breakdown", "offload", "RPC", "CUDA0", "flash_attn")
NOT_BUILT = "not run: gateway not built yet"


@dataclass
class Bench:
    """Settings of one run and the results as they accumulate."""

    llama: LlamaCpp
    model: Path
    summary: dict[str, Any]
    out: Path
    workdir: Path
    reps: int
    n_prompt: int
    n_predict: int
    ctx: int
    memory_limit: str
    deadline: float
    results: dict[str, Any]

    @property
    def logdir(self) -> Path:
        return self.workdir / "logs"

    @property
    def server_args(self) -> list[str]:
        """Flags every hand-started llama-server gets: those of llamafleet's coordinator (one slot),
        and a log level that shows where the tensors went."""
        n_gpu_layers = int(self.summary["shape"]["n_layers"]) + 1
        return ["--n-gpu-layers", str(n_gpu_layers), "--ctx-size", str(self.ctx), "--parallel", "1",
                "--fit", "off", "--no-webui", "-lv", "4"]

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "results.md").write_text(markdown(self.results))


def measure_server(bench: Bench, url: str) -> dict[str, Any]:
    """Warm up once, then `reps` requests of an `n_prompt` prompt and `n_predict` new tokens."""
    words = int(bench.summary["words"])
    complete(url, words_prompt(16, words, seed=0), 16)
    samples = []
    for rep in range(bench.reps):
        timings = complete(url, words_prompt(bench.n_prompt, words, seed=rep + 1), bench.n_predict)
        samples.append({k: timings.get(k) for k in ("prompt_n", "prompt_per_second", "predicted_n", "predicted_per_second")})
    for s in samples:
        if s["prompt_n"] != bench.n_prompt or s["predicted_n"] != bench.n_predict:
            raise BenchError(f"expected {bench.n_prompt} prompt and {bench.n_predict} predicted tokens, got {s}")
    return {
        "decode_tps": median([s["predicted_per_second"] for s in samples]),
        "prompt_tps": median([s["prompt_per_second"] for s in samples]),
        "samples": samples,
    }


def run_server_case(bench: Bench, name: str, args: list[str], env: dict[str, str] | None = None,
                    measure: bool = True) -> dict[str, Any]:
    """Start llama-server with `args`, record its load time (and speeds), stop it."""
    server = start_llama_server(bench.llama, name, bench.model, SERVER_PORT, [*bench.server_args, *args],
                                bench.logdir, env)
    result: dict[str, Any] = {"status": "ok", "load_s": round(server.load_s, 2), "argv": " ".join(server.argv[1:])}
    try:
        if measure:
            result |= measure_server(bench, server.url)
    finally:
        server.stop()
        result["placement_log"] = placement_lines(server.proc.log)
    return result


def placement_lines(log: Path, limit: int = 80) -> list[str]:
    """The lines of a llama-server log that show devices, buffers and layer placement."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return [f"(no log: {exc})"]
    return [line[:220] for line in lines if any(m in line for m in PLACEMENT_MARKERS)][:limit]


# ---- stages ---------------------------------------------------------------------------------


def stage_membw(bench: Bench) -> None:
    """Measure the copy bandwidth (membw.py, in its own process) and derive the decode roofline."""
    script = Path(__file__).with_name("membw.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    try:
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        measured = {"error": f"membw.py exited {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    bench.results["device"]["membw"] = measured
    name = bench.results["device"].get("name", "")
    datasheet = next((bw for key, bw in DATASHEET_BANDWIDTH.items() if key in name), None)
    per_token = int(bench.summary["bytes_read_per_token"])
    roofline: dict[str, Any] = {"bytes_read_per_token": per_token, "datasheet_bandwidth_bytes_per_s": datasheet}
    if "bandwidth_bytes_per_s" in measured:
        roofline["measured_bandwidth_bytes_per_s"] = measured["bandwidth_bytes_per_s"]
        roofline["decode_tps_roofline_measured"] = measured["bandwidth_bytes_per_s"] / per_token
    if datasheet:
        roofline["decode_tps_roofline_datasheet"] = datasheet / per_token
    bench.results["roofline"] = roofline


@dataclass
class Fleet:
    """The benchmark's agents and controller, stopped together at the end."""

    agents: list[Proc]
    controller: Proc | None
    token: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{CONTROLLER_PORT}"

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
        for agent in self.agents:
            agent.stop()


def start_controller(bench: Bench, fleet: Fleet, coordinator: str) -> None:
    """The controller over the agents, its coordinators placed by `--coordinator` (stopped first if running)."""
    if fleet.controller is not None:
        fleet.controller.stop()
    argv = [llamafleet_bin("llamafleet"), "serve", "--listen", f"{LOOPBACK}:{CONTROLLER_PORT}",
            "--token-file", str(fleet.token), "--model", f"{MODEL_NAME}={bench.model}",
            "--llama-cpp", str(bench.llama.root), "--state-dir", str(bench.workdir / "controller-state"),
            "--default-ctx", str(bench.ctx), "--coordinator", coordinator]
    for spec in AGENTS:
        argv += ["--agent", spec.address]
    fleet.controller = start(f"controller-{coordinator}", argv, bench.logdir)


def stage_fleet(bench: Bench, fleet: Fleet) -> None:
    """Two agents on this machine's GPU, the controller over them, and its placement plan."""
    for spec in AGENTS:
        shutil.rmtree(bench.workdir / f"{spec.name}-cache", ignore_errors=True)
        # Each agent holds the model (a link to it), so a coordinator may run on it (llamafleet_worker).
        models = bench.workdir / f"{spec.name}-models"
        models.mkdir(parents=True, exist_ok=True)
        (models / f"{MODEL_NAME}.gguf").unlink(missing_ok=True)
        (models / f"{MODEL_NAME}.gguf").symlink_to(bench.model.resolve())
        fleet.agents.append(start_agent(spec, bench.llama, bench.workdir, fleet.token, bench.memory_limit,
                                        rpc_cache=True, logdir=bench.logdir, extra_args=("--models-dir", str(models))))
    statuses = {spec.name: agent_status(spec.address, fleet.token) for spec in AGENTS}
    bench.results["agents"] = {
        name: {"devices": s["devices"], "rpc_server": {k: s["rpc_server"][k] for k in ("state", "endpoint", "devices")},
               "build": s["build"]}
        for name, s in statuses.items()
    }
    start_controller(bench, fleet, "controller")

    def nodes_ready() -> bool:
        if not http_ok(f"{fleet.url}/llamafleet/v1/nodes"):
            return False
        nodes = json.loads(run_cli([llamafleet_bin("llamafleet"), "nodes", "--controller", fleet.url, "--json"]))
        return len(nodes) == len(AGENTS) and all(n["state"] == "ready" for n in nodes)

    wait_until(nodes_ready, "both agents ready at the controller", 90, fleet.controller, 0.5)
    plan = http_json("POST", f"{fleet.url}/llamafleet/v1/plan", {"model": MODEL_NAME, "ctx": bench.ctx})
    bench.results["plan"] = plan
    if not plan.get("fits"):
        raise BenchError(f"the planner says the model does not fit: {plan.get('reason')}")
    if len(plan["backends"]) != 2:
        raise BenchError(f"expected a 2-backend plan, got {plan['backends']} (adjust --memory-limit)")


def _two_backend_plan(bench: Bench) -> dict[str, Any] | None:
    """The controller's plan when it fits on exactly two backends, else None."""
    plan = bench.results.get("plan") or {}
    return plan if plan.get("fits") and len(plan.get("backends", [])) == 2 else None


def plan_split(bench: Bench) -> str:
    """The planner's --tensor-split, else an even layer split with the output layer on the last device."""
    if plan := _two_backend_plan(bench):
        return ",".join(str(n) for n in plan["tensor_split"])
    n = int(bench.summary["shape"]["n_layers"])
    return f"{n // 2},{n - n // 2 + 1}"


def stage_single(bench: Bench) -> None:
    """The whole model on the local GPU: the baseline."""
    bench.results["runs"]["single"] = run_server_case(bench, "llama-server-single", [])


def rpc_args(endpoints: list[str], split: str, rpc_devices_only: bool = True) -> list[str]:
    """`--rpc` and `--tensor-split`, and (as the coordinator does) `--device` naming only the RPC devices."""
    args = ["--rpc", ",".join(endpoints), "--tensor-split", split]
    if rpc_devices_only:
        args += ["--device", ",".join(f"RPC{i}" for i in range(len(endpoints)))]
    return args


def _rpc_case(bench: Bench, name: str, rpc_devices_only: bool) -> None:
    """Two bare rpc-servers (no cache) and a hand-started llama-server over them."""
    servers = [start_rpc_server(bench.llama, port, bench.logdir) for port in PLAIN_RPC_PORTS]
    try:
        endpoints = [f"{LOOPBACK}:{port}" for port in PLAIN_RPC_PORTS]
        result = run_server_case(bench, f"llama-server-{name}", rpc_args(endpoints, plan_split(bench), rpc_devices_only))
        result["load_note"] = "no rpc-server tensor cache: every tensor crosses the loopback socket"
        bench.results["runs"][name] = result
    finally:
        for server in servers:
            server.stop()


def stage_rpc(bench: Bench) -> None:
    """Hand-started split with the coordinator's flags."""
    _rpc_case(bench, "rpc", rpc_devices_only=True)


def stage_rpc_local_gpu(bench: Bench) -> None:
    """Hand-started split with llama.cpp's default device list (the local GPU at split 0)."""
    _rpc_case(bench, "rpc_local_gpu", rpc_devices_only=False)


def _dir_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def clear_agent_caches(bench: Bench) -> None:
    """Empty the agents' rpc tensor caches (the files only: the running rpc-servers keep the folder)."""
    for spec in AGENTS:
        for entry in (bench.workdir / f"{spec.name}-cache" / "rpc").glob("*"):
            if entry.is_file():
                entry.unlink()


def stage_cache(bench: Bench) -> None:
    """Load over the agents' rpc-servers (with -c) twice: cold (empty cache), then warm."""
    plan = _two_backend_plan(bench)
    args = rpc_args(plan["backends"] if plan else [spec.rpc_endpoint for spec in AGENTS], plan_split(bench))
    caches = [bench.workdir / f"{spec.name}-cache" for spec in AGENTS]
    clear_agent_caches(bench)
    cold = run_server_case(bench, "llama-server-cache-cold", args, measure=False)
    cached = sum(_dir_bytes(c) for c in caches)
    warm = run_server_case(bench, "llama-server-cache-warm", args)
    bench.results["runs"]["rpc_agents"] = warm | {"load_note": "over the agents' rpc-servers, --rpc-cache warm"}
    bench.results["load"] = {
        "single_local_s": bench.results["runs"].get("single", {}).get("load_s"),
        "rpc_no_cache_s": bench.results["runs"].get("rpc", {}).get("load_s"),
        "rpc_cache_cold_s": cold["load_s"],
        "rpc_cache_warm_s": warm["load_s"],
        "cache_bytes_after_cold_load": cached,
        "note": "spawn of llama-server to /health 200; the model file is in the page cache (tmpfs) every time",
    }


def gateway_built() -> bool:
    """Whether this llamafleet has the gateway (issue 5) to measure."""
    try:
        importlib.import_module("llamafleet.controller.gateway")
    except ImportError:
        return False
    return True


def stage_llamafleet_worker(bench: Bench, fleet: Fleet) -> None:
    """As `llamafleet`, with the coordinator on the agent with the larger share (`--coordinator auto`):
    that share on the GPU directly, the other over RPC."""
    if fleet.controller is None:
        raise BenchError("the controller is not running (the fleet stage failed)")
    start_controller(bench, fleet, "auto")

    def placed_on_worker() -> bool:
        if not http_ok(f"{fleet.url}/llamafleet/v1/nodes"):
            return False
        plan = http_json("POST", f"{fleet.url}/llamafleet/v1/plan", {"model": MODEL_NAME, "ctx": bench.ctx})
        bench.results["plan_worker"] = plan
        return bool(plan.get("fits")) and plan.get("coordinator") not in (None, "controller")

    # The agents and the controller hash the file first (sha256 of the GGUF) to know who holds it.
    wait_until(placed_on_worker, "a plan with the coordinator on a worker", 240, fleet.controller, 1.0)
    stage_llamafleet(bench, fleet, "llamafleet_worker")


def stage_rpc_one_local(bench: Bench) -> None:
    """Hand-started split with the first share over one bare rpc-server and the second (with the
    output layer) on the coordinator's own GPU: what a coordinator on a GPU worker does."""
    server = start_rpc_server(bench.llama, PLAIN_RPC_PORTS[1], bench.logdir)
    try:
        flipped = ",".join(reversed(plan_split(bench).split(",")))
        args = ["--rpc", f"{LOOPBACK}:{PLAIN_RPC_PORTS[1]}", "--device", "RPC0,CUDA0", "--tensor-split", flipped]
        result = run_server_case(bench, "llama-server-rpc_one_local", args)
        result["load_note"] = "the first share crosses the loopback socket (no cache); the second is read locally"
        bench.results["runs"]["rpc_one_local"] = result
    finally:
        server.stop()


def stage_llamafleet(bench: Bench, fleet: Fleet, name: str = "llamafleet") -> None:
    """The gateway: the first request starts the coordinator (load), then the timed requests."""
    if not gateway_built():
        bench.results["runs"][name] = {"status": NOT_BUILT}
        return
    if fleet.controller is None or not fleet.controller.alive():
        raise BenchError("the controller is not running (the fleet stage failed)")
    words = int(bench.summary["words"])

    def generate(prompt: str, n_predict: int, **extra: Any) -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        # raw: the prompt as it is, no chat template, so it has exactly n_prompt tokens.
        reply = http_json("POST", f"{fleet.url}/api/generate", {
            "model": MODEL_NAME, "prompt": prompt, "raw": True, "stream": False,
            "options": {"num_predict": n_predict, "temperature": 0, "seed": 1}, **extra,
        }, timeout_s=600)
        return reply, time.monotonic() - started

    # Ollama's empty prompt loads the model (the coordinator starts over the planned backends).
    clear_agent_caches(bench)
    cold, cold_wall = generate("", 1)
    generate(words_prompt(16, words, seed=0), 16)
    samples = []
    for rep in range(bench.reps):
        reply, wall = generate(words_prompt(bench.n_prompt, words, seed=rep + 1), bench.n_predict)
        samples.append({
            "prompt_eval_count": reply.get("prompt_eval_count"), "eval_count": reply.get("eval_count"),
            "prompt_per_second": reply["prompt_eval_count"] / (reply["prompt_eval_duration"] / 1e9),
            "predicted_per_second": reply["eval_count"] / (reply["eval_duration"] / 1e9),
            "total_duration_s": reply.get("total_duration", 0) / 1e9, "wall_s": round(wall, 3),
        })
    try:
        ps = http_json("GET", f"{fleet.url}/api/ps", timeout_s=30)
    except BenchError as exc:
        ps = {"error": str(exc)}
    # keep_alive 0 unloads; the next load finds the agents' caches warm.
    unload, _ = generate("", 1, keep_alive=0)
    warm, warm_wall = generate("", 1)
    coordinator_logs = sorted(p for p in bench.workdir.rglob("*.log") if "coordinator" in str(p))
    # The coordinator's log starts with its command line ("# llama-server …").
    coordinator_argv = [log.read_text(errors="replace").splitlines()[0] for log in coordinator_logs if log.stat().st_size]
    bench.results["runs"][name] = {
        "status": "ok",
        "load_s": round(cold.get("load_duration", 0) / 1e9, 2),
        "load_cache_cold_s": round(cold.get("load_duration", 0) / 1e9, 2),
        "load_cache_cold_wall_s": round(cold_wall, 2),
        "unload_reply": unload,
        "load_cache_warm_s": round(warm.get("load_duration", 0) / 1e9, 2),
        "load_cache_warm_wall_s": round(warm_wall, 2),
        "decode_tps": median([s["predicted_per_second"] for s in samples]),
        "prompt_tps": median([s["prompt_per_second"] for s in samples]),
        "samples": samples,
        "ps": ps,
        "coordinator_argv": coordinator_argv,
        "coordinator_logs": [str(p) for p in coordinator_logs],
        "controller_log_tail": fleet.controller.tail(40),
        "load_note": "load_duration of an empty-prompt /api/generate (coordinator start), agents' caches "
                     "emptied first; warm: after a keep_alive 0 unload",
    }


# ---- report ---------------------------------------------------------------------------------


def derive(results: dict[str, Any]) -> None:
    """Ratios between the setups and fractions of the roofline."""
    runs = results["runs"]
    roof = results.get("roofline", {})
    single = runs.get("single", {})
    for run in runs.values():
        if run.get("status") != "ok" or not run.get("decode_tps"):
            continue
        for key in ("measured", "datasheet"):
            if roof.get(f"decode_tps_roofline_{key}"):
                run[f"decode_fraction_of_roofline_{key}"] = run["decode_tps"] / roof[f"decode_tps_roofline_{key}"]
        if single.get("decode_tps"):
            run["decode_vs_single"] = run["decode_tps"] / single["decode_tps"]
            run["prompt_vs_single"] = run["prompt_tps"] / single["prompt_tps"]
    fleet, rpc = runs.get("llamafleet", {}), runs.get("rpc", {})
    if fleet.get("decode_tps") and rpc.get("decode_tps"):
        fleet["decode_vs_hand_rpc"] = fleet["decode_tps"] / rpc["decode_tps"]
        fleet["prompt_vs_hand_rpc"] = fleet["prompt_tps"] / rpc["prompt_tps"]
    worker, local = runs.get("llamafleet_worker", {}), runs.get("rpc_one_local", {})
    if worker.get("decode_tps") and fleet.get("decode_tps"):
        worker["decode_vs_controller_coordinator"] = worker["decode_tps"] / fleet["decode_tps"]
    if local.get("decode_tps") and rpc.get("decode_tps"):
        local["decode_vs_hand_rpc"] = local["decode_tps"] / rpc["decode_tps"]


LABELS = {
    "single": "llama-server alone on the local device (all layers)",
    "rpc": "hand-started llama-server --rpc, 2 bare rpc-servers",
    "rpc_agents": "hand-started llama-server --rpc, the 2 agents' rpc-servers",
    "llamafleet": "llamafleet (agents + controller + gateway)",
    "rpc_local_gpu": "as hand-started, without --device (coordinator's own device listed too)",
    "rpc_one_local": "hand-started, first share over 1 rpc-server, second (with the output layer) on the coordinator's GPU",
    "llamafleet_worker": "llamafleet, coordinator on the worker with the larger share (--coordinator auto)",
}


def _fmt(value: Any, spec: str = ".1f") -> str:
    """A number for the table, or an en dash when there is none."""
    return "–" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """The report: device, date, model and settings, then the speed and load tables."""
    dev, model, roof = results["device"], results["model"], results.get("roofline", {})
    on_gpu = "no GPU" not in str(dev.get("name"))
    title = (f"# GPU benchmark: {model['shape']['name']} {model['type']} split over two rpc-servers" if on_gpu else
             f"# Script trial on a machine without a GPU ({model['shape']['name']} {model['type']}): "
             "checks that every path runs; not a performance result")
    lines = [
        title,
        "",
        f"- device: {dev.get('name')} ({dev.get('total_mib')} MiB), driver {dev.get('driver')}, "
        f"{dev.get('device_kind', '')}".rstrip(", "),
        f"- date: {results['date']}",
        f"- llama.cpp: {results.get('llama_cpp_version')}",
        (f"- model: {model['shape']['name']} shape, {model['type']}, random weights, "
        f"{model['file_bytes'] / 1e9:.2f} GB file, {model['bytes_read_per_token'] / 1e9:.3f} GB of weights read per token"),
        (f"- requests: {results['settings']['n_prompt']}-token prompt, {results['settings']['n_predict']} new tokens, "
        f"greedy, seed 1, median of {results['settings']['reps']}; ctx {results['settings']['ctx']}"),
        (f"- split: `--tensor-split {results.get('tensor_split')}` "
        f"({'from the llamafleet plan' if results.get('split_from_plan') else 'even fallback: no 2-backend plan'}), "
        f"agents capped at --memory-limit {results['settings']['memory_limit']} each, both on this one device"),
    ]
    if roof.get("decode_tps_roofline_measured"):
        lines.append(f"- decode roofline: {roof['measured_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s measured copy bandwidth "
                     f"÷ {roof['bytes_read_per_token'] / 1e9:.3f} GB = {roof['decode_tps_roofline_measured']:.0f} tok/s"
                     + (f" (datasheet {roof['datasheet_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s: "
                        f"{roof['decode_tps_roofline_datasheet']:.0f} tok/s)" if roof.get("decode_tps_roofline_datasheet") else ""))
    lines += [
        "",
        "| setup | load s | prompt tok/s | decode tok/s | decode vs single | decode / roofline |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in LABELS.items():
        run = results["runs"].get(key)
        if run is None:
            continue
        if run.get("status") != "ok":
            lines.append(f"| {label} | {run.get('status')} | | | | |")
            continue
        lines.append(f"| {label} | {_fmt(run.get('load_s'), '.2f')} | {_fmt(run.get('prompt_tps'), '.0f')} | "
                     f"{_fmt(run.get('decode_tps'), '.1f')} | {_fmt(run.get('decode_vs_single'), '.3f')} | "
                     f"{_fmt(run.get('decode_fraction_of_roofline_measured'), '.3f')} |")
    load = results.get("load")
    if load:
        lines += ["", "| load (spawn → /health 200) | s |", "| --- | ---: |",
                  f"| local device, no RPC | {_fmt(load['single_local_s'], '.2f')} |",
                  f"| RPC, no tensor cache | {_fmt(load['rpc_no_cache_s'], '.2f')} |",
                  f"| RPC, agents' --rpc-cache cold (empty) | {_fmt(load['rpc_cache_cold_s'], '.2f')} |",
                  f"| RPC, agents' --rpc-cache warm | {_fmt(load['rpc_cache_warm_s'], '.2f')} |"]
        fleet_run = results["runs"].get("llamafleet", {})
        if fleet_run.get("status") == "ok":
            lines += [f"| llamafleet gateway (load_duration), agents' cache cold | {_fmt(fleet_run['load_cache_cold_s'], '.2f')} |",
                      f"| llamafleet gateway (load_duration), agents' cache warm | {_fmt(fleet_run['load_cache_warm_s'], '.2f')} |"]
    fleet = results["runs"].get("llamafleet", {})
    if fleet.get("decode_vs_hand_rpc"):
        lines += ["", (f"llamafleet vs hand-started RPC: decode {fleet['decode_vs_hand_rpc']:.3f}, "
                      f"prompt {fleet['prompt_vs_hand_rpc']:.3f}.")]
    nvml = results.get("nvml")
    if nvml and nvml.get("gpus"):
        g = nvml["gpus"][0]
        lines += ["", (f"NVML (agent) vs nvidia-smi: total {g.get('agent_total_mib')} vs {g['smi_total_mib']} MiB, "
                      f"free diff {g.get('free_diff_mib')} MiB; rpc-server banner: {g.get('banner_name')} "
                      f"'{g.get('banner_description')}' {g.get('banner_total_mib')} MiB total; "
                      f"within {nvml['tolerance_mib']} MiB: {'yes' if nvml['ok'] else 'no'}")]
    if results.get("not_run"):
        lines += ["", "Not run:"] + [f"- {item}" for item in results["not_run"]]
    return "\n".join(lines) + "\n"


def print_summary(results: dict[str, Any]) -> None:
    """Print the report last, where the device tool's output tail shows it."""
    print()
    print(markdown(results))


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="install dir (bin/llama-server, bin/ggml-rpc-server)")
    parser.add_argument("--model", type=Path, required=True, help="GGUF written by make_model.py (with its .json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llamafleet-gpu-bench"))
    parser.add_argument("--nvml", type=Path, help="nvml_check.py's JSON, to include in the report")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-predict", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--memory-limit", default="6GiB", help="per agent; below the model's size so placement needs both")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="skip stages that would end later than this")
    parser.add_argument("--stages", default="membw,fleet,single,rpc,rpc_one_local,cache,llamafleet,llamafleet_worker,"
                                            "rpc_local_gpu")
    parser.add_argument("--not-run", action="append", default=[], help="a line for the report's 'not run' list")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    summary = json.loads(Path(f"{args.model}.json").read_text())
    gpu = first_gpu()
    manifest_path = args.llama_cpp / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": gpu | {"device_kind": os.environ.get("LLAMAFLEET_DEVICE_KIND", "")},
        "llama_cpp_version": manifest.get("version"),
        "llama_cpp_backends": manifest.get("backends"),
        "llama_cpp_cmake_flags": manifest.get("cmake_flags"),
        "model": summary,
        "settings": {"reps": args.reps, "n_prompt": args.n_prompt, "n_predict": args.n_predict, "ctx": args.ctx,
                     "memory_limit": args.memory_limit},
        "runs": {},
        "not_run": list(args.not_run),
        "errors": {},
    }
    if args.nvml and args.nvml.exists():
        results["nvml"] = json.loads(args.nvml.read_text())
    bench = Bench(LlamaCpp(args.llama_cpp), args.model, summary, args.out, args.workdir, args.reps, args.n_prompt,
                  args.n_predict, args.ctx, args.memory_limit, begin + args.deadline_s, results)
    fleet = Fleet([], None, write_token(args.workdir / "token"))
    stages: dict[str, Callable[[], None]] = {
        "membw": lambda: stage_membw(bench),
        "fleet": lambda: stage_fleet(bench, fleet),
        "single": lambda: stage_single(bench),
        "rpc": lambda: stage_rpc(bench),
        "cache": lambda: stage_cache(bench),
        "llamafleet": lambda: stage_llamafleet(bench, fleet),
        "rpc_local_gpu": lambda: stage_rpc_local_gpu(bench),
        "rpc_one_local": lambda: stage_rpc_one_local(bench),
        "llamafleet_worker": lambda: stage_llamafleet_worker(bench, fleet),
    }
    try:
        for name in args.stages.split(","):
            left = bench.deadline - time.monotonic()
            cost = 1 if name.startswith("llamafleet") and not gateway_built() else STAGE_COST_S[name]
            if left < cost:
                results["not_run"].append(f"{name}: skipped, {left:.0f} s left of the time budget "
                                          f"(needs about {cost} s)")
                continue
            started = time.monotonic()
            print(f"== {name} ({time.monotonic() - begin:.0f} s in)", flush=True)
            try:
                stages[name]()
            except BenchError as exc:
                results["errors"][name] = str(exc)
                print(f"   {name} failed: {exc}", flush=True)
            results.setdefault("stage_seconds", {})[name] = round(time.monotonic() - started, 1)
            results["tensor_split"] = plan_split(bench)
            results["split_from_plan"] = _two_backend_plan(bench) is not None
            derive(results)
            bench.save()
    finally:
        fleet.stop()
    fleet_run = results["runs"].get("llamafleet", {})
    if fleet_run.get("status") == NOT_BUILT:
        results["not_run"].append(f"llamafleet 2-backend split through the gateway: {NOT_BUILT}")
    results["total_seconds"] = round(time.monotonic() - begin, 1)
    derive(results)
    bench.save()
    print_summary(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
