"""Many users and many models through the gateway, on the GPU(s) of one machine (issue 13).

Two measurements, each with two llamafleet agents (sharing this machine's GPU, each capped with
`--memory-limit`) and a controller with its default `--parallel auto`:

1. streams: one model that needs both agents (the caps are below its size); 1, 4 and 8
   concurrent streamed `POST /api/generate` (raw prompt, `num_predict` new tokens, greedy), each
   stream its own prompt. Aggregate tok/s = total `eval_count` ÷ wall time from the first start
   to the last end, the median of `--reps`, and its ratio to one stream; the per-stream decode
   rate from each final line's `eval_count / eval_duration`; the slot count `--parallel auto`
   chose (`llamafleet ps --json`, field `parallel`). `--direct` also sends the same requests
   straight to the coordinator's `/completion` (what the gateway costs); `--order` says whether
   the reps of one count run together (blocked, the default) or the counts take turns.
2. two_models: two names of the one GGUF (two links in the models dir), requests alternating
   between them for `--rounds` rounds; the second model's time to first token p50/p99 (over all
   rounds, the first with its load, as bench/many_models.py counts it, and over the rounds after
   the first) and its `load_duration`. Caps here (`--two-models-memory-limit`) let both stay
   loaded, each on its own rpc-server.

    python bench/gpu/streams_bench.py --llama-cpp DIR --model M.gguf --out DIR [--deadline-s 300]

Writes results.json (every sample) and results.md (the tables) to --out, after each stage.
Nothing here is imported by the test suite.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet import (
    LOOPBACK,
    AgentSpec,
    BenchError,
    LlamaCpp,
    Proc,
    agent_status,
    http_json,
    http_ok,
    llamafleet_bin,
    first_gpu,
    nvidia_smi,
    run_cli,
    start,
    start_agent,
    wait_until,
    words_prompt,
    write_token,
)

AGENTS = (AgentSpec("agent-a", 50151, 50152), AgentSpec("agent-b", 50161, 50162))
CONTROLLER_PORT = 11500
MODEL = "bench"
SECOND_MODEL = "bench-copy"
# Rough seconds each stage needs (8B Q8_0 on an H200: ~25 s per load over RPC), for the deadline.
STAGE_COST_S = {"streams": 75, "two_models": 90}


@dataclass
class Fleet:
    """Agents and a controller, stopped together."""

    agents: list[Proc] = field(default_factory=list)
    controller: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{CONTROLLER_PORT}"

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None
        for agent in self.agents:
            agent.stop()
        self.agents = []


@dataclass
class Bench:
    llama: LlamaCpp
    model: Path
    summary: dict[str, Any]
    out: Path
    workdir: Path
    token: Path
    args: argparse.Namespace
    deadline: float
    results: dict[str, Any]

    @property
    def logdir(self) -> Path:
        return self.workdir / "logs"

    @property
    def words(self) -> int:
        return int(self.summary["words"])

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (self.out / "results.md").write_text(markdown(self.results))


def start_fleet(bench: Bench, fleet: Fleet, limits: tuple[str, str], names: tuple[str, ...], tag: str) -> dict[str, Any]:
    """Two agents with `limits`, a controller serving `names` (links to the one GGUF), both ready."""
    models = bench.workdir / f"models-{tag}"
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    for name in names:
        (models / f"{name}.gguf").symlink_to(bench.model.resolve())
    for spec, limit in zip(AGENTS, limits, strict=True):
        # The agents' tensor caches stay between stages: a later load hashes but sends nothing.
        fleet.agents.append(start_agent(spec, bench.llama, bench.workdir, bench.token, limit,
                                        rpc_cache=True, logdir=bench.logdir / tag))
    argv = [llamafleet_bin("llamafleet"), "serve", "--listen", f"{LOOPBACK}:{CONTROLLER_PORT}",
            "--token-file", str(bench.token), "--models-dir", str(models),
            "--llama-cpp", str(bench.llama.root), "--state-dir", str(bench.workdir / f"controller-{tag}"),
            "--default-ctx", str(bench.args.ctx), *bench.args.controller_arg]
    for spec in AGENTS:
        argv += ["--agent", spec.address]
    fleet.controller = start(f"controller-{tag}", argv, bench.logdir / tag)

    def nodes_ready() -> bool:
        if not http_ok(f"{fleet.url}/llamafleet/v1/nodes"):
            return False
        nodes = json.loads(run_cli([llamafleet_bin("llamafleet"), "nodes", "--controller", fleet.url, "--json"]))
        return len(nodes) == len(AGENTS) and all(n["state"] == "ready" for n in nodes)

    wait_until(nodes_ready, "both agents ready at the controller", 90, fleet.controller, 0.5)
    plans = {name: http_json("POST", f"{fleet.url}/llamafleet/v1/plan", {"model": name, "ctx": bench.args.ctx})
             for name in names}
    return {"argv": " ".join(argv), "memory_limits": list(limits),
            "plans": {name: compact_plan(plan) for name, plan in plans.items()},
            "agents": {spec.name: {k: v for k, v in agent_status(spec.address, bench.token).items()
                                   if k in ("devices", "rpc_server", "rpc_servers", "memory_limit_bytes")}
                       for spec in AGENTS}}


def compact_plan(plan: dict[str, Any]) -> dict[str, Any]:
    keep = ("fits", "reason", "backends", "tensor_split", "estimate", "excluded", "warnings")
    out = {k: plan.get(k) for k in keep}
    out["assignments"] = [{k: a.get(k) for k in ("node", "endpoint", "device", "first_layer", "layer_count",
                                                 "total_bytes", "usable_bytes", "kv_bytes")}
                          for a in plan.get("assignments", [])]
    return out


def ps(fleet: Fleet) -> list[dict[str, Any]]:
    """`llamafleet ps --json`."""
    return json.loads(run_cli([llamafleet_bin("llamafleet"), "ps", "--controller", fleet.url, "--json"]))


def ps_entry(fleet: Fleet, model: str) -> dict[str, Any]:
    for doc in ps(fleet):
        if doc["model"] in (model, f"{model}:latest"):
            return doc
    raise BenchError(f"{model} is not in `llamafleet ps --json`")


def generate(fleet: Fleet, model: str, prompt: str, n_predict: int, **extra: Any) -> dict[str, Any]:
    """One streamed /api/generate; the final line's fields plus client-side times (monotonic s)."""
    conn = http.client.HTTPConnection(LOOPBACK, CONTROLLER_PORT, timeout=600)
    body = {"model": model, "prompt": prompt, "raw": True, "stream": True,
            "options": {"num_predict": n_predict, "temperature": 0, "seed": 1}, **extra}
    started = time.perf_counter()
    first = None
    final: dict[str, Any] = {}
    pieces = 0
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise BenchError(f"/api/generate {model}: HTTP {reply.status}: {reply.read()[:400]!r}")
        for raw in reply:
            if not raw.strip():
                continue
            doc = json.loads(raw)
            if "error" in doc:
                raise BenchError(f"/api/generate {model}: {doc['error']}")
            if doc.get("done"):
                final = doc
            else:
                pieces += 1
                if first is None:
                    first = time.perf_counter()
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        raise BenchError(f"/api/generate {model}: {exc}") from exc
    finally:
        conn.close()
    ended = time.perf_counter()
    eval_count = int(final.get("eval_count") or 0)
    eval_ns = int(final.get("eval_duration") or 0)
    return {
        "start": started, "end": ended, "wall_s": round(ended - started, 4),
        "ttft_s": round(first - started, 4) if first is not None else None,
        "pieces": pieces, "eval_count": eval_count, "eval_duration_s": eval_ns / 1e9,
        "decode_tps": eval_count / (eval_ns / 1e9) if eval_ns else None,
        "prompt_eval_count": final.get("prompt_eval_count"),
        "prompt_eval_duration_s": (final.get("prompt_eval_duration") or 0) / 1e9,
        "load_duration_s": (final.get("load_duration") or 0) / 1e9,
        "done_reason": final.get("done_reason"),
    }


def generate_direct(port: int, prompt: str, n_predict: int) -> dict[str, Any]:
    """The same request straight to the coordinator (llama-server's streamed /completion), no gateway."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=600)
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "seed": 1, "stream": True}
    started = time.perf_counter()
    first = None
    final: dict[str, Any] = {}
    pieces = 0
    try:
        conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise BenchError(f"coordinator /completion: HTTP {reply.status}: {reply.read()[:400]!r}")
        for raw in reply:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            doc = json.loads(line[5:])
            if doc.get("stop"):
                final = doc
            else:
                pieces += 1
                if first is None:
                    first = time.perf_counter()
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        raise BenchError(f"coordinator /completion: {exc}") from exc
    finally:
        conn.close()
    ended = time.perf_counter()
    timings = final.get("timings") or {}
    eval_count = int(timings.get("predicted_n") or 0)
    eval_s = float(timings.get("predicted_ms") or 0) / 1e3
    return {
        "start": started, "end": ended, "wall_s": round(ended - started, 4),
        "ttft_s": round(first - started, 4) if first is not None else None,
        "pieces": pieces, "eval_count": eval_count, "eval_duration_s": eval_s,
        "decode_tps": eval_count / eval_s if eval_s else None,
        "prompt_eval_count": timings.get("prompt_n"),
        "prompt_eval_duration_s": float(timings.get("prompt_ms") or 0) / 1e3,
        "load_duration_s": 0.0, "done_reason": final.get("stop_type"),
    }


def concurrent(fleet: Fleet, model: str, prompts: list[str], n_predict: int,
               direct_port: int | None = None) -> dict[str, Any]:
    """All prompts at once (a barrier lines the threads up); aggregate tok/s over first start → last end.
    Through the gateway, or with `direct_port` straight to the coordinator."""
    barrier = threading.Barrier(len(prompts))
    results: list[dict[str, Any] | BaseException] = [RuntimeError("not run")] * len(prompts)

    def one(i: int) -> None:
        try:
            barrier.wait(30)
            if direct_port is None:
                results[i] = generate(fleet, model, prompts[i], n_predict)
            else:
                results[i] = generate_direct(direct_port, prompts[i], n_predict)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise BenchError(f"{len(errors)} of {len(prompts)} streams failed: {errors[0]}")
    streams = [r for r in results if isinstance(r, dict)]
    wall = max(s["end"] for s in streams) - min(s["start"] for s in streams)
    tokens = sum(s["eval_count"] for s in streams)
    return {
        "streams": len(prompts), "wall_s": round(wall, 4), "tokens": tokens, "aggregate_tps": tokens / wall,
        "per_stream_decode_tps": [round(s["decode_tps"], 2) if s["decode_tps"] else None for s in streams],
        "per_stream_ttft_s": [s["ttft_s"] for s in streams],
        "short_streams": sum(1 for s in streams if s["eval_count"] < n_predict),
        "samples": [{k: v for k, v in s.items() if k not in ("start", "end")} for s in streams],
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank on the sorted values, as bench/many_models.py takes p99."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- stages ---------------------------------------------------------------------------------


def stage_streams(bench: Bench, fleet: Fleet) -> None:
    args = bench.args
    result: dict[str, Any] = {"status": "running"}
    bench.results["streams"] = result
    result["fleet"] = start_fleet(bench, fleet, (args.memory_limit, args.memory_limit), (MODEL,), "streams")
    load = generate(fleet, MODEL, "", 1)  # an empty prompt loads the model (Ollama's way)
    doc = ps_entry(fleet, MODEL)
    result["load_duration_s"] = round(load["load_duration_s"], 2)
    result["load_wall_s"] = load["wall_s"]
    result["parallel"] = doc.get("parallel")
    result["ps"] = doc
    print(f"   loaded in {load['wall_s']:.1f} s; --parallel auto chose {doc.get('parallel')} slots; "
          f"backends {doc.get('backends')}, tensor split {doc.get('tensor_split')}", flush=True)
    try:
        result["gpu_after_load"] = nvidia_smi()
    except (OSError, subprocess.SubprocessError) as exc:
        result["gpu_after_load"] = f"nvidia-smi: {exc}"
    # Warm-up: one stream, then as many at once as the largest count (every batch size's kernels).
    generate(fleet, MODEL, words_prompt(16, bench.words, seed=0), 16)
    top = max(args.streams)
    concurrent(fleet, MODEL, [words_prompt(16, bench.words, seed=100 + i) for i in range(top)], 16)
    port = coordinator_port(bench.workdir / "controller-streams")
    result["coordinator_port"] = port
    paths = ["gateway"] + (["direct"] if args.direct and port else [])
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {p: {n: [] for n in args.streams} for p in paths}
    # blocked: every rep of 1 stream, then of 4, then of 8 (the gateway first, then direct);
    # interleaved: 1, 4, 8, 1, 4, 8, ... (gateway then direct each time). The order matters:
    # llama-server saves every idle slot's KV to its host prompt cache when a task starts, which
    # over RPC reads it back from the rpc-servers (seen: ~35 ms per slot the run before used,
    # before the first token), so a run right after a larger one starts late.
    if args.order == "blocked":
        order = [(path, n) for path in paths for n in args.streams for _ in range(args.reps)]
    else:
        order = [(path, n) for _ in range(args.reps) for n in args.streams for path in paths]
    seed = 1000
    for path, n in order:
        prompts = [words_prompt(args.n_prompt, bench.words, seed=seed + i) for i in range(n)]
        seed += n
        samples[path][n].append(concurrent(fleet, MODEL, prompts, args.n_predict,
                                           port if path == "direct" else None))
    for path in paths:
        runs = summarize(samples[path])
        result["runs" if path == "gateway" else "direct_runs"] = runs
        for n, run in runs.items():
            print(f"   {path}: {n} stream(s): {run['aggregate_tps']:.1f} tok/s aggregate "
                  f"(reps {run['aggregate_tps_reps']}), {run['vs_one_stream']:.2f}x, per stream "
                  f"{run['per_stream_decode_tps_median']:.1f} tok/s", flush=True)
    bench.save()
    after = ps_entry(fleet, MODEL)
    result["restarts"] = after.get("restarts")
    result["controller_log_tail"] = fleet.controller.tail(30) if fleet.controller else ""
    result["coordinator_argv"] = coordinator_argv(bench.workdir / "controller-streams")
    result["status"] = "ok"
    fleet.stop()


def summarize(by_count: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for n, reps in by_count.items():
        aggregates = [r["aggregate_tps"] for r in reps]
        decode = [d for r in reps for d in r["per_stream_decode_tps"] if d]
        ttft = [t for r in reps for t in r["per_stream_ttft_s"] if t is not None]
        runs[str(n)] = {
            "aggregate_tps": statistics.median(aggregates),
            "aggregate_tps_reps": [round(a, 1) for a in aggregates],
            "per_stream_decode_tps_median": statistics.median(decode) if decode else None,
            "per_stream_decode_tps_min": min(decode) if decode else None,
            "ttft_s_median": statistics.median(ttft) if ttft else None,
            "short_streams": sum(r["short_streams"] for r in reps),
            "reps": reps,
        }
    one = runs.get("1", {}).get("aggregate_tps")
    for run in runs.values():
        run["vs_one_stream"] = run["aggregate_tps"] / one if one else None
    return runs


def coordinator_port(state: Path) -> int | None:
    """The coordinator's --port, from the argv line its log starts with."""
    for line in coordinator_argv(state):
        words = line.split()
        if "--port" in words:
            return int(words[words.index("--port") + 1])
    return None


def coordinator_argv(state: Path) -> list[str]:
    """The first line (argv) of each coordinator log under a controller's state dir."""
    logs = sorted(state.rglob("*.log"))
    return [log.read_text(errors="replace").splitlines()[0][:2000] for log in logs
            if "coordinator" in str(log) and log.stat().st_size]


def stage_two_models(bench: Bench, fleet: Fleet) -> None:
    args = bench.args
    result: dict[str, Any] = {"status": "running"}
    bench.results["two_models"] = result
    limits = tuple(args.two_models_memory_limit.split(","))
    if len(limits) == 1:
        limits = limits * 2
    result["fleet"] = start_fleet(bench, fleet, limits, (MODEL, SECOND_MODEL), "two")
    first = generate(fleet, MODEL, words_prompt(8, bench.words, seed=1), 4)
    result["first_model_load_duration_s"] = round(first["load_duration_s"], 2)
    rounds = []
    for i in range(args.rounds):
        a = generate(fleet, MODEL, words_prompt(16, bench.words, seed=2 * i + 10), 8)
        b = generate(fleet, SECOND_MODEL, words_prompt(16, bench.words, seed=2 * i + 11), 8)
        rounds.append({"first": {k: a[k] for k in ("ttft_s", "wall_s", "load_duration_s")},
                       "second": {k: b[k] for k in ("ttft_s", "wall_s", "load_duration_s")}})
        if i == 0:
            result["second_model_ps_load_duration_s"] = ps_entry(fleet, SECOND_MODEL).get("load_duration_s")
    loaded = ps(fleet)
    ttft = [r["second"]["ttft_s"] for r in rounds if r["second"]["ttft_s"] is not None]
    later = ttft[1:]
    load_s = result.get("second_model_ps_load_duration_s") or rounds[0]["second"]["load_duration_s"]
    result |= {
        "rounds": rounds,
        "second_model_load_duration_s": load_s,
        "second_ttft_p50_s": statistics.median(ttft) if ttft else None,
        "second_ttft_p99_s": percentile(ttft, 0.99) if ttft else None,
        "second_ttft_first_round_s": ttft[0] if ttft else None,
        "second_ttft_after_first_p50_s": statistics.median(later) if later else None,
        "second_ttft_after_first_p99_s": percentile(later, 0.99) if later else None,
        "first_ttft_p50_s": statistics.median([r["first"]["ttft_s"] for r in rounds if r["first"]["ttft_s"]]),
        "reloads_of_second": sum(1 for r in rounds[1:] if r["second"]["load_duration_s"] > 0.5),
        "reloads_of_first": sum(1 for r in rounds if r["first"]["load_duration_s"] > 0.5),
        "ps": [{k: d.get(k) for k in ("model", "state", "backends", "nodes", "tensor_split", "parallel",
                                      "load_duration_s", "restarts")} for d in loaded],
        "nodes": [{"address": n.get("address"), "rpc_servers": n.get("rpc_servers")}
                  for n in json.loads(run_cli([llamafleet_bin("llamafleet"), "nodes", "--controller", fleet.url,
                                               "--json"]))],
    }
    p99 = result["second_ttft_p99_s"]
    result["target_p99_le_load_plus_1s"] = bool(p99 is not None and load_s is not None and p99 <= load_s + 1)
    print(f"   second model: load {load_s}s; first token p50 {result['second_ttft_p50_s']:.3f}s, p99 {p99:.3f}s "
          f"(after the first round: p50 {result['second_ttft_after_first_p50_s']:.3f}s, "
          f"p99 {result['second_ttft_after_first_p99_s']:.3f}s)", flush=True)
    result["controller_log_tail"] = fleet.controller.tail(30) if fleet.controller else ""
    result["status"] = "ok"
    fleet.stop()


# ---- report ---------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    dev, model, s = results["device"], results["model"], results["settings"]
    on_gpu = "no GPU" not in str(dev.get("name"))
    lines = [
        (f"# Many streams and two models through the gateway: {model['shape']['name']} {model['type']}" if on_gpu else
         f"# Script trial without a GPU ({model['shape']['name']} {model['type']}): not a performance result"),
        "",
        f"- device: {dev.get('name')} ({dev.get('total_mib')} MiB), driver {dev.get('driver')}",
        f"- date: {results['date']}; llama.cpp {results.get('llama_cpp_version')}",
        (f"- model: {model['shape']['name']} shape, {model['type']}, random weights, {model['file_bytes'] / 1e9:.2f} GB "
         f"file, {model['bytes_read_per_token'] / 1e9:.3f} GB read per token"),
        (f"- requests: streamed `POST /api/generate`, raw {s['n_prompt']}-token prompt (one per stream), "
         f"{s['n_predict']} new tokens, temperature 0; median of {s['reps']} ({s.get('order', 'blocked')} order); controller `--default-ctx {s['ctx']}`, "
         f"`--parallel auto` (default), agents `--memory-limit {s['memory_limit']}` each, both on this one device"),
    ]
    streams = results.get("streams")
    if streams:
        lines.append(f"- slots chosen by `--parallel auto` (`llamafleet ps --json` `parallel`): "
                     f"**{streams.get('parallel')}**; backends {(streams.get('ps') or {}).get('backends')}, "
                     f"tensor split {(streams.get('ps') or {}).get('tensor_split')}; load "
                     f"{streams.get('load_duration_s')} s (load_duration)")
        lines += ["", "| streams | aggregate tok/s | vs 1 stream | reps tok/s | per-stream decode tok/s (median) "
                      "| first token s (median) |",
                  "| ---: | ---: | ---: | --- | ---: | ---: |"]
        for n, run in (streams.get("runs") or {}).items():
            lines.append(f"| {n} | {_fmt(run.get('aggregate_tps'))} | {_fmt(run.get('vs_one_stream'), '.2f')}x | "
                         f"{', '.join(str(a) for a in run.get('aggregate_tps_reps', []))} | "
                         f"{_fmt(run.get('per_stream_decode_tps_median'))} | {_fmt(run.get('ttft_s_median'), '.3f')} |")
        direct = streams.get("direct_runs")
        if direct:
            lines += ["", "The same coordinator asked directly (its streamed `/completion`, no gateway), "
                          f"in the same {s.get('order', 'blocked')} order:", "",
                      "| streams | direct aggregate tok/s | vs 1 stream | reps tok/s | per-stream decode tok/s | "
                      "gateway ÷ direct |", "| ---: | ---: | ---: | --- | ---: | ---: |"]
            for n, run in direct.items():
                gw = (streams.get("runs") or {}).get(n, {}).get("aggregate_tps")
                lines.append(f"| {n} | {_fmt(run.get('aggregate_tps'))} | {_fmt(run.get('vs_one_stream'), '.2f')}x | "
                             f"{', '.join(str(a) for a in run.get('aggregate_tps_reps', []))} | "
                             f"{_fmt(run.get('per_stream_decode_tps_median'))} | "
                             f"{_fmt(gw / run['aggregate_tps'] if gw and run.get('aggregate_tps') else None, '.3f')} |")
        eight = (streams.get("runs") or {}).get("8", {})
        if eight.get("vs_one_stream"):
            lines += ["", f"Target >= 2.5x at 8 streams: {eight['vs_one_stream']:.2f}x, "
                          f"{'met' if eight['vs_one_stream'] >= 2.5 else 'MISSED'}."]
        short = sum(r.get("short_streams", 0) for r in (streams.get("runs") or {}).values())
        if short:
            lines.append(f"({short} stream(s) ended before {s['n_predict']} tokens: EOS; counted as generated.)")
        if streams.get("status") != "ok":
            lines.append(f"streams stage: {streams.get('status')}")
    two = results.get("two_models")
    if two:
        lines += ["", f"## Two models alternating ({s['rounds']} rounds, 8 tokens each; agents "
                      f"`--memory-limit {s['two_models_memory_limit']}`)"]
        if two.get("status") == "ok":
            lines += [
                "",
                "| second model | s |", "| --- | ---: |",
                f"| load_duration | {_fmt(two.get('second_model_load_duration_s'), '.2f')} |",
                f"| first token p50 (all rounds) | {_fmt(two.get('second_ttft_p50_s'), '.3f')} |",
                f"| first token p99 (all rounds, the first with its load) | {_fmt(two.get('second_ttft_p99_s'), '.3f')} |",
                f"| first token, first round | {_fmt(two.get('second_ttft_first_round_s'), '.3f')} |",
                f"| first token p50 / p99 after the first round | {_fmt(two.get('second_ttft_after_first_p50_s'), '.3f')}"
                f" / {_fmt(two.get('second_ttft_after_first_p99_s'), '.3f')} |",
                f"| first model's first token p50 | {_fmt(two.get('first_ttft_p50_s'), '.3f')} |",
                "",
                f"Reloads after the first round: second model {two.get('reloads_of_second')}, first model "
                f"{two.get('reloads_of_first')}. Target p99 <= load + 1 s: "
                f"{'met' if two.get('target_p99_le_load_plus_1s') else 'MISSED'}.",
                "",
                "| model | backends | parallel | load s |", "| --- | --- | ---: | ---: |",
            ]
            for d in two.get("ps", []):
                lines.append(f"| {d.get('model')} | {', '.join(d.get('backends') or [])} | {d.get('parallel')} | "
                             f"{_fmt(d.get('load_duration_s'), '.2f')} |")
        else:
            lines.append(f"two_models stage: {two.get('status')}")
    for name, error in results.get("errors", {}).items():
        lines += ["", f"**{name} failed**: {error[:1500]}"]
    if results.get("not_run"):
        lines += ["", "Not run:"] + [f"- {item}" for item in results["not_run"]]
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="install dir (bin/llama-server, bin/ggml-rpc-server)")
    parser.add_argument("--model", type=Path, required=True, help="GGUF written by make_model.py (with its .json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llamafleet-streams-bench"))
    parser.add_argument("--memory-limit", default="7GiB", help="per agent, streams stage: below the model's size")
    parser.add_argument("--two-models-memory-limit", default="20GiB,7GiB",
                        help="per agent (one, or two with a comma), two_models stage")
    parser.add_argument("--ctx", type=int, default=2048, help="the controller's --default-ctx (context per slot)")
    parser.add_argument("--streams", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-prompt", type=int, default=64)
    parser.add_argument("--n-predict", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--direct", action=argparse.BooleanOptionalAction, default=False,
                        help="also ask the coordinator directly (no gateway): how much the gateway costs")
    parser.add_argument("--order", choices=("blocked", "interleaved"), default="blocked",
                        help="blocked: all reps of one count, then the next; interleaved: 1,4,8,1,4,8,...")
    parser.add_argument("--controller-arg", action="append", default=[], help="one more flag for llamafleet serve")
    parser.add_argument("--deadline-s", type=float, default=300.0, help="skip stages that would end later than this")
    parser.add_argument("--stages", default="streams,two_models")
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
        "model": summary,
        "settings": {k: getattr(args, k) for k in ("memory_limit", "two_models_memory_limit", "ctx", "streams", "reps",
                                                   "n_prompt", "n_predict", "rounds", "controller_arg", "direct", "order")},
        "not_run": list(args.not_run),
        "errors": {},
        "stage_seconds": {},
    }
    bench = Bench(LlamaCpp(args.llama_cpp), args.model, summary, args.out, args.workdir,
                  write_token(args.workdir / "token"), args, begin + args.deadline_s, results)
    fleet = Fleet()
    stages = {"streams": stage_streams, "two_models": stage_two_models}
    try:
        for name in args.stages.split(","):
            left = bench.deadline - time.monotonic()
            if left < STAGE_COST_S[name]:
                results["not_run"].append(f"{name}: skipped, {left:.0f} s left of the time budget "
                                          f"(needs about {STAGE_COST_S[name]} s)")
                continue
            started = time.monotonic()
            print(f"== {name} ({started - begin:.0f} s in, {left:.0f} s left)", flush=True)
            try:
                stages[name](bench, fleet)
            except BenchError as exc:
                results["errors"][name] = str(exc)
                results.get(name, {})["status"] = "failed"
                print(f"   {name} failed: {exc}", flush=True)
                for proc in [*fleet.agents, *([fleet.controller] if fleet.controller else [])]:
                    results.setdefault("log_tails", {})[f"{name}/{proc.name}"] = proc.tail(40)
            finally:
                fleet.stop()
            results["stage_seconds"][name] = round(time.monotonic() - started, 1)
            bench.save()
    finally:
        fleet.stop()
    results["total_seconds"] = round(time.monotonic() - begin, 1)
    bench.save()
    print()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
