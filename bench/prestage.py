"""Bytes on the rpc sockets during the first load, with pre-staging vs without (issue 15). Run by hand.

Each round starts a fresh fleet (two CPU agents on loopback, empty rpc caches) per model and
mode, and loads the model once:
- `network`: the agents hold no model file, every weight byte crosses the rpc sockets (their
  rpc-servers run with `-c`, as by default, and fill their cache from what they receive);
- `staged`:  both agents hold the file (a symlink in their --models-dir), so each agent writes
  the cache entries of its share before llama-server starts;
- `pulled`:  the agents' models dirs start empty; `llamafleet pull` puts the file on both, each
  then stages every large tensor in the background (with the controller's tensor hashes, made
  for the pull), and the load comes once both `stage` events (`after_pull`) are in: the first
  load after a pull, as issue 15 names it.
The modes take turns within a round, so drift on this shared machine hits all of them. Each runs on
every build given (`--llama-cpp`; default LLAMAFLEET_TEST_LLAMA_CPP, which scripts/test.sh
builds with llamafleet's patches, and LLAMAFLEET_TEST_LLAMA_CPP_STOCK when set): with the patches
the coordinator takes the controller's pre-computed tensor hashes instead of hashing every
weight, and an agent pre-stages by reference (a `.ref` span of its GGUF) instead of a copy.

Models: `gemma` (LLAMAFLEET_TEST_MODEL, gemma-3-270m: ~70 MB of its tensors are 10 MiB or less and
always travel with stock llama.cpp) and `llama-1g`, a 1.14 GB llama-shaped Q8_0 model with random
weights whose every matrix is above the 10 MiB hash threshold (`bench/gpu/make_model.py
--shape llama-1g`, written once to ~/.cache/llamafleet-bench/).

Bytes counted: the kernel's `bytes_received` (`ss -tin`) of every established TCP socket whose
local end is an rpc-server's endpoint, read right after the model is ready and before any
generation. A coordinator's connections are new for the load, so that is everything the
rpc-servers received from it during the load: commands, tensor payloads, and the warm-up graph.
Two ratios: to the model's tensor bytes (the GGUF's data section), and to the bytes the
rpc-servers hold (layers and output; the token embeddings stay on the coordinator's host, and
with tied embeddings, as gemma's, the output is a second copy of them). `floor` is the share
of tensors of 10 MiB or less: what stock llama.cpp sends whatever the caches hold.

`hash+place s` is the request's time outside pre-staging and llama-server's load: placement,
and the controller's pre-computed tensor hashes (computed once per model file, by the first load
or pull that needs them; every round starts a fresh controller, so each first load here that is
not after a pull pays it).

    .venv/bin/python bench/prestage.py [--rounds 1] [--models gemma,llama-1g] [--llama-cpp DIR,DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ollama  # noqa: E402
import psutil  # noqa: E402

from llamafleet.common.llamacpp.install import Manifest, read_manifest  # noqa: E402
from llamafleet.controller.gguf import GGUFHeader, read_gguf_header  # noqa: E402
from llamafleet.controller.prestage import HASH_THRESHOLD, output_tensors  # noqa: E402
from tests.integration.agent.harness import wait_for  # noqa: E402
from tests.integration.controller.harness import AgentHost, Fleet, running_fleet  # noqa: E402

BENCH_CACHE = Path.home() / ".cache" / "llamafleet-bench"
MODES = ("network", "staged", "pulled")
_RECEIVED = re.compile(r"bytes_received:(\d+)")


@dataclass(frozen=True)
class BenchModel:
    """A model and the fleet that must split it over both agents."""

    name: str
    path: Path
    memory_limits: tuple[str, str]  # per agent; the second (more room) holds the output layer
    controller_args: tuple[str, ...] = ()


def synthetic_model(shape: str = "llama-1g") -> Path:
    """The make_model.py GGUF of `shape` under ~/.cache/llamafleet-bench, written on first use."""
    from bench.gpu.make_model import SHAPES, write_model  # numpy and gguf only here

    path = BENCH_CACHE / f"{shape}-q8_0.gguf"
    if not (path.exists() and Path(f"{path}.json").exists()):
        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        print(f"writing {path} (once) …", file=sys.stderr)
        partial = path.with_suffix(".partial")
        write_model(partial, SHAPES[shape], "q8_0")
        Path(f"{partial}.json").replace(Path(f"{path}.json"))
        partial.replace(path)
    return path


def bench_model(name: str) -> BenchModel:
    if name == "gemma":
        return BenchModel("gemma", Path(os.environ["LLAMAFLEET_TEST_MODEL"]), ("260MiB", "300MiB"))
    if name == "llama-1g":
        # A context of 512 keeps the KV cache small, so 2 + 2 layers (the output with the second) fit.
        return BenchModel("llama-1g", synthetic_model("llama-1g"), ("600MiB", "720MiB"), ("--default-ctx", "512"))
    raise SystemExit(f"unknown model {name!r}: gemma or llama-1g")


@dataclass(frozen=True)
class Build:
    """A llama.cpp install the whole fleet runs (coordinator and rpc-servers)."""

    manifest: Manifest

    @property
    def label(self) -> str:
        return "patched" if self.manifest.patch_names else "stock"


def builds(option: str) -> list[Build]:
    """`--llama-cpp DIR,DIR` or, by default, the test suite's builds (patched, then stock when set)."""
    dirs = [d for d in option.split(",") if d] if option else [
        os.environ.get("LLAMAFLEET_TEST_LLAMA_CPP", ""), os.environ.get("LLAMAFLEET_TEST_LLAMA_CPP_STOCK", "")]
    found = [Build(read_manifest(Path(d))) for d in dirs if d]
    if not found:
        raise SystemExit("no llama.cpp build: set LLAMAFLEET_TEST_LLAMA_CPP (see the README's Tests) or pass --llama-cpp")
    return found


@dataclass(frozen=True)
class WeightBytes:
    tensors: int  # the GGUF's data section
    on_rpc: int  # what the rpc-servers hold: every layer and the output
    on_rpc_small: int  # of those, tensors of 10 MiB or less: always sent

    @classmethod
    def of(cls, header: GGUFHeader) -> WeightBytes:
        held = [t for t in header.tensors if t.name.startswith("blk.")] + output_tensors(header)
        return cls(sum(t.n_bytes for t in header.tensors), sum(t.n_bytes for t in held),
                   sum(t.n_bytes for t in held if t.n_bytes <= HASH_THRESHOLD))


def received_bytes(endpoint: str, netns: str | None = None) -> int:
    """Sum of bytes_received over the established sockets whose local address is `endpoint`
    (looked up inside network namespace `netns`, if given)."""
    host, port = endpoint.rsplit(":", 1)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = subprocess.run([*prefix, "ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's first line: local and peer address
            fields = line.split()
            mine = len(fields) >= 3 and fields[2] == f"{host}:{port}"
        elif mine and (m := _RECEIVED.search(line)):
            total += int(m.group(1))
    return total


def fleet_received(fleet: Fleet, netns: Sequence[str | None] = ()) -> int:
    return sum(received_bytes(a.rpc_endpoint, netns[i] if i < len(netns) else None)
               for i, a in enumerate(fleet.agents))


def plan_holders(fleet: Fleet, model: str) -> list[str]:
    result = fleet.cli("plan", model, "--json")
    return json.loads(result.stdout)["holders"] if result.returncode == 0 else []


def fleet_for(workdir: Path, model: BenchModel, mode: str, build: Build, hosts: tuple[AgentHost, ...] = (),
              extra_agent_args: tuple[str, ...] = ()) -> Any:
    """A fresh fleet for one round of `mode` (a context manager yielding the Fleet)."""
    stores = [workdir / f"store{i}" for i in range(2)]
    for store in stores:
        store.mkdir(parents=True)
        if mode == "staged":
            (store / f"{model.name}.gguf").symlink_to(model.path)
    # A pull needs a models dir of each node's own: two agents never write one file.
    args = tuple((*(("--models-dir", str(store)) if mode in ("staged", "pulled") else ()), *extra_agent_args)
                 for store in stores)
    return running_fleet(workdir / "fleet", build.manifest, model.path,
                         memory_limit=model.memory_limits, agent_args=args, model_names=(model.name,),
                         controller_args=(*model.controller_args, "--coordinator", "controller"), hosts=hosts)


def wait_until_holders(fleet: Fleet, model: str) -> None:
    """The agents hash their models dir at start (and list a pulled file at their next report): a
    load before the controller knows both hold the file would send their share over the network."""
    nodes = {a.address for a in fleet.agents}
    wait_for(lambda: nodes <= set(plan_holders(fleet, model)), 300, "both nodes confirmed as holders", interval_s=0.5)


def pull(fleet: Fleet, model: str) -> dict[str, float]:
    """`llamafleet pull MODEL` onto every node, then wait for each node's staging after it; their seconds."""
    started = time.monotonic()
    result = fleet.cli("pull", model, "--json", timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"llamafleet pull {model} failed: {result.stderr.strip()[-500:]}")
    pulled_at = time.monotonic()
    nodes = {a.address for a in fleet.agents}

    def staged() -> dict[str, dict[str, Any]] | None:
        events = json.loads(fleet.cli("events", "--json", "--limit", "1000").stdout)
        done = {e["subject"]: e for e in events
                if e["kind"] in ("stage", "stage.failed") and e.get("data", {}).get("after_pull")}
        return done if nodes <= done.keys() else None

    done = wait_for(staged, 600, "every node's staging after the pull", interval_s=0.25)
    if failed := [e["message"] for e in done.values() if e["kind"] == "stage.failed"]:
        raise SystemExit(f"staging after the pull failed: {'; '.join(failed)}")
    wait_until_holders(fleet, model)
    return {"pull_s": pulled_at - started, "stage_after_pull_s": time.monotonic() - pulled_at}


def prepare(fleet: Fleet, model: str, mode: str) -> dict[str, float]:
    """Bring the fleet to the state `mode` loads from; what it took (a pull and its staging)."""
    if mode == "staged":
        wait_until_holders(fleet, model)
    if mode == "pulled":
        return pull(fleet, model)
    return {"pull_s": 0.0, "stage_after_pull_s": 0.0}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def first_load(fleet: Fleet, model: str, netns: Sequence[str | None] = ()) -> dict[str, float]:
    """Load `model` once (an empty prompt only loads) and count what the rpc-servers received, and
    the CPU seconds each part used meanwhile: the agents (pre-staging), the rpc-servers, and the
    coordinator (llama-server, started by this load: all its CPU is the load's)."""
    rpc_pids = [a.rpc().pid for a in fleet.agents]
    before = fleet_received(fleet, netns)
    agents_before = sum(cpu_s(a.proc.pid) for a in fleet.agents)
    rpc_before = sum(cpu_s(pid) for pid in rpc_pids)
    started = time.monotonic()
    ollama.Client(host=fleet.url, timeout=900).generate(model=model, prompt="")
    wall = time.monotonic() - started
    received = fleet_received(fleet, netns) - before
    [loaded] = fleet.ps()
    prestage = loaded.get("prestage") or {}
    stage_s = float(prestage.get("seconds", 0.0))
    return {"request_s": wall, "load_duration_s": loaded["load_duration_s"], "stage_s": stage_s,
            "hash_place_s": wall - stage_s - loaded["load_duration_s"],
            "precomputed_hashes": bool(loaded.get("tensor_hashes")),
            "referenced": sum(int(n.get("referenced", 0)) for n in (prestage.get("nodes") or {}).values()),
            "prestaged_bytes": loaded["prestaged_bytes"],
            "received": received, "coordinator_cpu_s": cpu_s(loaded["pid"]),
            "rpc_servers_cpu_s": sum(cpu_s(pid) for pid in rpc_pids) - rpc_before,
            "agents_cpu_s": sum(cpu_s(a.proc.pid) for a in fleet.agents) - agents_before}


def one_round(workdir: Path, model: BenchModel, mode: str, build: Build) -> dict[str, float]:
    with fleet_for(workdir, model, mode, build) as fleet:
        before = prepare(fleet, model.name, mode)
        return {**before, **first_load(fleet, model.name)}


def medians(rows: list[dict[str, Any]], group: Sequence[str], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Median of `keys` over the rows of each distinct value of `group` (in order of appearance)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[g] for g in group), []).append(row)
    return [{**dict(zip(group, values, strict=True)), **{k: statistics.median(r[k] for r in mine) for k in keys}}
            for values, mine in groups.items()]


def main() -> None:
    try:
        run()
    except KeyboardInterrupt:
        print("interrupted; every fleet started was stopped", file=sys.stderr)
        sys.exit(130)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--models", default="gemma,llama-1g", help="comma-separated: gemma, llama-1g")
    parser.add_argument("--llama-cpp", default="", help="comma-separated llama.cpp install dirs (default: the tests')")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the table")
    args = parser.parse_args()
    models = [bench_model(name) for name in args.models.split(",")]
    runs = builds(args.llama_cpp)
    weights = {m.name: WeightBytes.of(read_gguf_header(m.path)) for m in models}
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a, **k: print(*a, **k, flush=True))
    for m in models:
        w = weights[m.name]
        say(f"{m.name}: {w.tensors:,} tensor bytes, {w.on_rpc:,} on the rpc-servers "
            f"(floor {w.on_rpc_small / w.tensors:.4f}); 2 CPU agents on loopback capped at {', '.join(m.memory_limits)}")
    for b in runs:
        say(f"{b.label}: {b.manifest.install_dir} ({', '.join(b.manifest.patch_names) or 'no patches'})")
    say("CPU s: what the agents (pre-staging), the coordinator (llama-server) and the rpc-servers used during the load")
    say(f"{'model':9} {'build':7} {'mode':8} {'round':>5} {'hash+place':>10} {'stage':>6} {'load':>6} {'request s':>9} "
        f"{'rpc bytes in':>14} {'÷ tensors':>9} {'÷ on rpc':>8} {'pre-staged':>14} | {'CPU s: agents':>13} "
        f"{'coord':>6} {'rpc':>6} | {'pull s':>6} {'then staged s':>13}")
    rows: list[dict[str, Any]] = []
    for round_ in range(1, args.rounds + 1):
        for m in models:
            for b in runs:
                for mode in MODES:
                    with tempfile.TemporaryDirectory(prefix="prestage-bench-") as tmp:
                        r = one_round(Path(tmp), m, mode, b)
                    w = weights[m.name]
                    row = {"model": m.name, "build": b.label, "mode": mode, "round": round_, **r,
                           "ratio_tensors": r["received"] / w.tensors, "ratio_on_rpc": r["received"] / w.on_rpc}
                    rows.append(row)
                    say(f"{m.name:9} {b.label:7} {mode:8} {round_:>5} {r['hash_place_s']:>10.2f} {r['stage_s']:>6.2f} "
                        f"{r['load_duration_s']:>6.2f} {r['request_s']:>9.2f} {int(r['received']):>14,} "
                        f"{row['ratio_tensors']:>9.4f} {row['ratio_on_rpc']:>8.4f} {int(r['prestaged_bytes']):>14,} | "
                        f"{r['agents_cpu_s']:>13.2f} {r['coordinator_cpu_s']:>6.2f} {r['rpc_servers_cpu_s']:>6.2f} | "
                        f"{r['pull_s']:>6.2f} {r['stage_after_pull_s']:>13.2f}")
    summary = medians(rows, ("model", "build", "mode"), ("ratio_tensors", "ratio_on_rpc", "request_s",
                                                         "load_duration_s", "stage_s", "hash_place_s"))
    for m in models:
        w = weights[m.name]
        for b in runs:
            by_mode = {s["mode"]: s for s in summary if s["model"] == m.name and s["build"] == b.label}
            say(f"{m.name} ({b.label}), medians: rpc bytes ÷ tensor bytes "
                + ", ".join(f"{mode} {by_mode[mode]['ratio_tensors']:.4f}" for mode in MODES)
                + f" (floor {w.on_rpc_small / w.tensors:.4f}; target ≤ {'0.05' if m.name == 'llama-1g' else '0.28'}); "
                + "request to loaded " + ", ".join(f"{mode} {by_mode[mode]['request_s']:.2f} s" for mode in MODES))
    if args.json:
        doc = {"weights": {k: vars(v) for k, v in weights.items()},
               "builds": {b.label: str(b.manifest.install_dir) for b in runs}, "rows": rows, "medians": summary}
        print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
