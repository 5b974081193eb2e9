"""Where a split model's decode time goes: one model, one GPU, the same split through each path.

Issue 22 asks for a two-share split with one share on the coordinator's own GPU to decode at
≥ 0.85 of the single GPU, where two remote shares gave 0.70; measured, the local share did not
help. This runs, side by side in one run, every path a token can take, so that the difference
between two rows is one cause:

- `single`: the whole model on CUDA0 of llama-server (the baseline); `single_nographs`: the same
  without CUDA graphs (`GGML_CUDA_DISABLE_GRAPHS`), which is what a split loses if graphs break;
- `rpc1`: the whole model on one rpc-server (one process hop per token, no split);
  `rpc1_server_nographs`: the same with CUDA graphs off in that rpc-server;
- `rpc2`: two shares on two rpc-servers (what a controller-host coordinator does);
- `local_rpc`: the first share on the coordinator's CUDA0, the second on an rpc-server (what a
  coordinator on the worker does); `rpc_local`: the other way round (output layer local);
- `*_nopp`: the same with llama.cpp's pipeline parallelism off (it turns itself on whenever every
  device has events, RPC included; a harmless `--override-tensor` is what turns it off);
- `*_nographs`: CUDA graphs off in the coordinator; `*_lv4`: at `-lv 4` (the log level the older
  split_bench runs used, and the one at which llama.cpp logs its graph splits and copies, kept here).
- `*_waitall`: both llama-server and the rpc-servers with `GGML_RPC_WAIT_ALL=1`, which turns back
  on the waits that patches 0006 (client) and 0007 (rpc-server) take away; `*_client`: only the
  rpc-servers so, which leaves 0006 alone at work.

Each path's answers are fingerprinted: the table says whether they are the single GPU's.

The rpc-servers run with `-c` over one shared cache folder and llama-server reads pre-computed
tensor hashes (patch 0002, when built with it), so after the first load every load is short.
Speeds are llama-server's own `timings` from /completion: greedy, `ignore_eos`, no prompt cache,
an `--n-prompt` prompt, `--n-predict` new tokens, the median of `--reps` after one warm-up.

    python bench/gpu/decode_paths.py --llama-cpp DIR --model M.gguf --out DIR [--split 17,16]

Nothing here is imported by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet import (
    LOOPBACK,
    BenchError,
    LlamaCpp,
    Proc,
    complete,
    median,
    first_gpu,
    start,
    start_llama_server,
    tcp_open,
    wait_until,
    words_prompt,
)

SERVER_PORT = 18191
# c: CUDA graphs off in the server; d, e: GGML_RPC_WAIT_ALL (stock llama.cpp's waits, patches 0006, 0007)
RPC_PORTS = {"a": 50352, "b": 50362, "c": 50372, "d": 50382, "e": 50392}
# Any tensor override turns llama.cpp's pipeline parallelism off; this one moves nothing (the token
# embeddings live on the CPU anyway).
NO_PIPELINE = ["--override-tensor", r"token_embd\.weight=CPU"]
NO_GRAPHS = {"GGML_CUDA_DISABLE_GRAPHS": "1"}
VERBOSE = ["-lv", "4"]
WAIT_ALL = {"GGML_RPC_WAIT_ALL": "1"}
# Log lines worth keeping: where tensors went, pipeline parallelism, the scheduler's splits.
LOG_MARKERS = ("pipeline parallelism", "model buffer size", "compute buffer size", "splits =", "sched copies",
               "flash_attn")


@dataclass(frozen=True)
class Route:
    """One way through: llama-server's flags and environment, and which rpc-servers it uses."""

    name: str
    what: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def routes(split: str) -> list[Route]:
    a, b, c, d, e = (f"{LOOPBACK}:{RPC_PORTS[k]}" for k in "abcde")
    two = ("--rpc", f"{a},{b}", "--device", "RPC0,RPC1", "--tensor-split", split)
    local_first = ("--rpc", b, "--device", "CUDA0,RPC0", "--tensor-split", split)
    flipped = ",".join(reversed(split.split(",")))
    local_last = ("--rpc", b, "--device", "RPC0,CUDA0", "--tensor-split", flipped)
    # The same through the rpc-servers that wait as stock llama.cpp does.
    two_stock = ("--rpc", f"{d},{e}", "--device", "RPC0,RPC1", "--tensor-split", split)
    local_first_stock = ("--rpc", d, "--device", "CUDA0,RPC0", "--tensor-split", split)
    local_last_stock = ("--rpc", d, "--device", "RPC0,CUDA0", "--tensor-split", flipped)
    return [
        Route("single", "whole model on the coordinator's CUDA0"),
        Route("single_nographs", "single, CUDA graphs off", env=NO_GRAPHS),
        Route("rpc1", "whole model on one rpc-server", ("--rpc", a, "--device", "RPC0")),
        Route("rpc2", "two shares on two rpc-servers", two),
        Route("local_rpc", "first share on CUDA0, second on an rpc-server", local_first),
        Route("rpc2_nopp", "rpc2, pipeline parallelism off", (*two, *NO_PIPELINE)),
        Route("local_rpc_nopp", "local_rpc, pipeline parallelism off", (*local_first, *NO_PIPELINE)),
        Route("local_rpc_nographs", "local_rpc, CUDA graphs off in the coordinator", local_first, NO_GRAPHS),
        Route("rpc_local", "first share on an rpc-server, second (and output) on CUDA0", local_last),
        Route("rpc_local_nopp", "rpc_local, pipeline parallelism off", (*local_last, *NO_PIPELINE)),
        Route("rpc1_server_nographs", "rpc1, CUDA graphs off in the rpc-server", ("--rpc", c, "--device", "RPC0")),
        Route("rpc1_waitall", "rpc1, both sides GGML_RPC_WAIT_ALL", ("--rpc", d, "--device", "RPC0"), WAIT_ALL),
        Route("rpc_local_waitall", "rpc_local, both sides GGML_RPC_WAIT_ALL", local_last_stock, WAIT_ALL),
        Route("rpc_local_client", "rpc_local, the rpc-server GGML_RPC_WAIT_ALL", local_last_stock),
        Route("rpc2_waitall", "rpc2, both sides GGML_RPC_WAIT_ALL", two_stock, WAIT_ALL),
        Route("rpc2_client", "rpc2, the rpc-servers GGML_RPC_WAIT_ALL", two_stock),
        Route("local_rpc_waitall", "local_rpc, both sides GGML_RPC_WAIT_ALL", local_first_stock, WAIT_ALL),
        Route("rpc2_lv4", "rpc2 at -lv 4 (its log: splits, copies)", (*two, *VERBOSE)),
        Route("local_rpc_lv4", "local_rpc at -lv 4 (its log: splits, copies)", (*local_first, *VERBOSE)),
    ]


def start_rpc_servers(llama: LlamaCpp, cache: Path, logdir: Path, chosen: list[Route]) -> list[Proc]:
    """The rpc-servers the chosen routes use (each one is a process and a CUDA context)."""
    used = [key for key, port in RPC_PORTS.items() if any(f"{LOOPBACK}:{port}" in arg for r in chosen for arg in r.args)]
    procs = []
    for key in used:
        port = RPC_PORTS[key]
        env = dict(os.environ) | {"LLAMA_CACHE": str(cache)} | (NO_GRAPHS if key == "c" else {}) \
            | (WAIT_ALL if key in "de" else {})
        proc = start(f"rpc-server-{key}", [str(llama.rpc_server), "-H", LOOPBACK, "-p", str(port), "-c"], logdir, env)
        wait_until(lambda port=port: tcp_open(port), f"rpc-server on port {port}", 60, proc)
        procs.append(proc)
    return procs


def tensor_hashes(model: Path, state: Path) -> Path | None:
    """The patched llama-server's pre-computed hashes file (None: llama-server hashes itself)."""
    try:
        from llamafleet.controller.gguf import read_gguf_header
        from llamafleet.controller.tensor_hashes import TensorHashes
        hashes = TensorHashes(state)
        try:
            made = asyncio.run(hashes.ensure(model, read_gguf_header(model)))
        finally:
            hashes.close()
    except (ImportError, OSError, RuntimeError) as exc:
        print(f"no pre-computed hashes ({exc}); every load hashes the weights", flush=True)
        return None
    return made.path if made else None


def measure(url: str, words: int, n_prompt: int, n_predict: int, reps: int) -> dict[str, Any]:
    complete(url, words_prompt(16, words, seed=0), 16)
    samples = [complete(url, words_prompt(n_prompt, words, seed=rep + 1), n_predict) for rep in range(reps)]
    for s in samples:
        if s.get("predicted_n") != n_predict or s.get("prompt_n") != n_prompt:
            raise BenchError(f"expected {n_prompt} prompt and {n_predict} predicted tokens, got {s}")
    tps = median([float(s["predicted_per_second"]) for s in samples])
    return {"decode_tps": tps, "ms_per_token": 1000.0 / tps if tps else None,
            "prompt_tps": median([float(s["prompt_per_second"]) for s in samples]),
            "samples_tps": [round(float(s["predicted_per_second"]), 1) for s in samples],
            "texts": [s["text_sha256"] for s in samples]}


def log_lines(log: Path, limit: int = 60) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError as exc:
        return [f"(no log: {exc})"]
    kept = [line[:240] for line in lines if any(m in line for m in LOG_MARKERS)]
    return kept[:limit]


def markdown(results: dict[str, Any]) -> str:
    dev = results["device"]
    lines = [
        f"# Decode paths of one split model on {dev.get('name')} ({results['date']})",
        "",
        f"- model: {results['model'].get('shape', {}).get('name')} shape, {results['model'].get('type')}, "
        f"split `{results['split']}`, {results['settings']['n_prompt']}-token prompt, "
        f"{results['settings']['n_predict']} new tokens, median of "
        f"{results['settings']['reps']}; pre-computed hashes: {'yes' if results.get('hashes') else 'no'}",
        "",
        "| path | what | decode tok/s | ms/token | vs single | ms over single | prompt tok/s | text as single |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    single = results["runs"].get("single", {}).get("ms_per_token")
    single_texts = results["runs"].get("single", {}).get("texts")
    for name, run in results["runs"].items():
        if run.get("status") != "ok":
            lines.append(f"| {name} | {run.get('what', '')} | {run.get('status')} | | | | | |")
            continue
        ms = run["ms_per_token"]
        ratio = f"{single / ms:.3f}" if single else "–"
        over = f"{ms - single:+.2f}" if single else "–"
        same = "–" if not single_texts else "same" if run.get("texts") == single_texts else "DIFFERENT"
        lines.append(f"| {name} | {run['what']} | {run['decode_tps']:.1f} | {ms:.2f} | {ratio} | {over} "
                     f"| {run['prompt_tps']:.0f} | {same} |")
    if results.get("not_run"):
        lines += ["", "Not run:"] + [f"- {item}" for item in results["not_run"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="GGUF written by make_model.py (with its .json)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llamafleet-decode-paths"))
    parser.add_argument("--split", default="17,16", help="--tensor-split of the two-share paths")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-predict", type=int, default=128)
    parser.add_argument("--n-prompt", type=int, default=1536,
                        help="prompt tokens: above the 512-token ubatch, where pipeline parallelism pays")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--deadline-s", type=float, default=300.0)
    parser.add_argument("--only", default="", help="comma-separated path names (default: all)")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    summary = json.loads(Path(f"{args.model}.json").read_text())
    n_layers = int(summary["shape"]["n_layers"])
    shutil.rmtree(args.workdir, ignore_errors=True)
    logdir = args.workdir / "logs"
    logdir.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    device = first_gpu()
    llama = LlamaCpp(args.llama_cpp)
    results: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": device,
                               "model": summary, "split": args.split, "runs": {}, "not_run": [],
                               "settings": {"reps": args.reps, "n_prompt": args.n_prompt, "n_predict": args.n_predict,
                                            "ctx": args.ctx}}
    hashes = tensor_hashes(args.model, args.workdir / "state")
    results["hashes"] = str(hashes) if hashes else None
    base_env = dict(os.environ) | ({"LLAMA_RPC_TENSOR_HASHES": str(hashes)} if hashes else {})
    base_args = ["--n-gpu-layers", str(n_layers + 1), "--ctx-size", str(args.ctx), "--parallel", "1",
                 "--fit", "off", "--no-webui"]
    wanted = set(filter(None, args.only.split(",")))
    chosen = [route for route in routes(args.split) if not wanted or route.name in wanted]
    servers = start_rpc_servers(llama, args.workdir / "cache", logdir, chosen)

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / "results.md").write_text(markdown(results))

    try:
        for route in chosen:
            left = args.deadline_s - (time.monotonic() - begin)
            if left < 25:
                results["not_run"].append(f"{route.name}: {left:.0f} s left of the budget")
                continue
            print(f"== {route.name} ({time.monotonic() - begin:.0f} s in)", flush=True)
            run: dict[str, Any] = {"what": route.what, "argv": " ".join(route.args), "env": route.env}
            try:
                server = start_llama_server(llama, f"llama-server-{route.name}", args.model, SERVER_PORT,
                                            [*base_args, *route.args], logdir, base_env | route.env)
                try:
                    run |= {"status": "ok", "load_s": round(server.load_s, 2)}
                    run |= measure(server.url, int(summary["words"]), args.n_prompt, args.n_predict, args.reps)
                finally:
                    server.stop()
                    run["log"] = log_lines(server.proc.log)
            except BenchError as exc:
                run["status"] = f"failed: {str(exc)[:300]}"
            results["runs"][route.name] = run
            print(f"   {run.get('status')}: {run.get('decode_tps') or 0:.1f} tok/s, load {run.get('load_s')} s",
                  flush=True)
            save()
    finally:
        for proc in servers:
            proc.stop()
    results["total_seconds"] = round(time.monotonic() - begin, 1)
    save()
    print(markdown(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
