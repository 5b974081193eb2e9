"""First load and recovery over an emulated 1 GbE link, with pre-staged workers vs without (issue 15).

Run by hand, as root. Each worker (its agent and the agent's rpc-servers) runs in a network
namespace of its own that this bench creates, linked to the root namespace by a veth pair whose
both ends are limited with `tc … tbf rate 1gbit` (see bench/netns.py); the controller, its
coordinator (llama-server) and the bench stay in the root namespace. Everything the coordinator
sends an rpc-server, and every gRPC call of the controller to an agent, crosses that link.

Each round starts a fresh fleet (two CPU agents, empty rpc caches) per mode, on the synthetic
1.14 GB llama-shaped Q8_0 model (`bench/gpu/make_model.py --shape llama-1g`, every matrix above
the 10 MiB hash threshold), and measures:
1. first load: request → loaded (an empty prompt only loads), split into pre-staging and
   llama-server's load, and the bytes the rpc-servers' sockets received (`ss -ti`);
2. reload: `llamafleet stop`, then the same request again, the caches (and the controller's
   tensor hashes) now warm;
3. recovery from an idle kill: `kill -9` of the rpc-server holding the output layer while
   nothing runs, then requests (2 tokens, streamed) until one gets its first token: the time
   from the kill to that token;
4. recovery from a kill during a generation: the same, the kill landing while a long
   generation streams (its stream ends with an error line, as the README says).
Before the second kill the fleet runs healthy for 31 s, so the agent's and the controller's
restart backoffs start from zero for both kills (they forgive after 30 s).

Modes (taking turns within a round, so drift on this shared machine hits all of them):
- `network`:  the agents hold no model file; their rpc-servers run with `-c` (the default), so
  the first load sends every weight byte and the rpc-server caches what it receives: its
  recovery reads that cache;
- `staged`:   both agents hold the file in --models-dir and pre-stage their share;
- `pulled`:   `llamafleet pull` puts the file on both (over the same link), each stages every large
  tensor in the background, and the first load comes after that (see bench/prestage.py);
- `uncached`: like `network` with `--no-rpc-cache`: every load, recovery included, sends every byte.

    sudo .venv/bin/python bench/prestage_link.py [--rounds 1] [--modes network,staged,pulled,uncached]
                                                 [--rate 1gbit] [--llama-cpp DIR,DIR] [--json]

Builds as in bench/prestage.py (`--llama-cpp`; default the tests' patched build, then the stock
one when LLAMAFLEET_TEST_LLAMA_CPP_STOCK is set).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ollama  # noqa: E402

from bench.netns import Link, exit_on_sigterm, shaped_links  # noqa: E402
from bench.prestage import (Build, WeightBytes, bench_model, builds, first_load, fleet_for,  # noqa: E402
                            fleet_received, prepare)
from llamafleet.controller.gguf import read_gguf_header  # noqa: E402
from tests.integration.agent.harness import wait_for  # noqa: E402
from tests.integration.controller.harness import AgentHost, Fleet  # noqa: E402

MODEL = "llama-1g"
MODES = ("network", "staged", "pulled", "uncached")
PROMPT = "t1 t2 t3 t4 t5 t6 t7 t8"  # one token per word in make_model.py's vocabulary
FORGIVEN_AFTER_S = 31.0  # RestartPolicy.healthy_reset_s (30 s) of both the agent and the controller
RECOVERY_TIMEOUT_S = 600.0
RETRY_PAUSE_S = 0.25


def first_token_s(fleet: Fleet, since: float) -> tuple[float, int]:
    """Streamed requests until one yields a token: (seconds from `since` to that token, failed tries)."""
    client = ollama.Client(host=fleet.url, timeout=RECOVERY_TIMEOUT_S)
    failed = 0
    while time.monotonic() - since < RECOVERY_TIMEOUT_S:
        try:
            for part in client.generate(model=MODEL, prompt=PROMPT, raw=True, stream=True,
                                        options={"num_predict": 2, "temperature": 0, "seed": 1}):
                if part.response or part.done:
                    return time.monotonic() - since, failed
        except (ollama.ResponseError, httpx.HTTPError, ConnectionError):
            pass
        failed += 1
        time.sleep(RETRY_PAUSE_S)
    raise AssertionError(f"no answer within {RECOVERY_TIMEOUT_S:.0f} s of the kill")


def output_agent(fleet: Fleet) -> int:
    """Index of the agent whose rpc-server is the coordinator's last backend (it holds the output layer)."""
    [loaded] = fleet.ps()
    last = loaded["backends"][-1]
    return next(i for i, a in enumerate(fleet.agents) if a.rpc_endpoint == last)


def kill_rpc_server(fleet: Fleet, index: int) -> float:
    """kill -9 agent #index's rpc-server; the moment it was sent."""
    os.kill(fleet.agents[index].rpc().pid, signal.SIGKILL)
    return time.monotonic()


def recover_idle(fleet: Fleet, index: int, netns: list[str]) -> dict[str, float]:
    killed_at = kill_rpc_server(fleet, index)
    seconds, failed = first_token_s(fleet, killed_at)
    return {"s": seconds, "failed_tries": failed, "received": fleet_received(fleet, netns)}


def recover_mid_generation(fleet: Fleet, index: int, netns: list[str]) -> dict[str, Any]:
    stream = ollama.Client(host=fleet.url, timeout=RECOVERY_TIMEOUT_S).generate(
        model=MODEL, prompt=PROMPT, raw=True, stream=True, options={"num_predict": 4000, "temperature": 0})
    for _, _part in zip(range(2), stream, strict=False):
        pass  # two pieces: the generation is under way
    killed_at = kill_rpc_server(fleet, index)
    try:
        for _part in stream:
            pass
        ended = "ended without an error"
    except (ollama.ResponseError, httpx.HTTPError) as exc:
        ended = f"error: {exc}"[:120]
    seconds, failed = first_token_s(fleet, killed_at)
    return {"s": seconds, "failed_tries": failed, "received": fleet_received(fleet, netns), "stream_end": ended}


def reload(fleet: Fleet, netns: list[str]) -> dict[str, float]:
    result = fleet.cli("stop", MODEL)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not fleet.ps(), 60, "the model unloaded", 0.2)
    return first_load(fleet, MODEL, netns)


def one_round(workdir: Path, links: list[Link], mode: str, build: Build) -> dict[str, Any]:
    model = bench_model(MODEL)
    hosts = tuple(AgentHost(link.worker_address, link.exec_prefix) for link in links)
    netns = [link.namespace for link in links]
    extra = ("--no-rpc-cache",) if mode == "uncached" else ()
    with fleet_for(workdir, model, "network" if mode == "uncached" else mode, build, hosts, extra) as fleet:
        load = {**prepare(fleet, MODEL, mode), **first_load(fleet, MODEL, netns)}
        again = reload(fleet, netns)
        victim = output_agent(fleet)
        idle = recover_idle(fleet, victim, netns)
        time.sleep(FORGIVEN_AFTER_S)
        wait_for(lambda: fleet.ps() and fleet.ps()[0].get("state") == "ready", 60, "the model ready", 0.5)
        busy = recover_mid_generation(fleet, victim, netns)
        return {"load": load, "reload": again, "idle": idle, "busy": busy}


def main() -> None:
    try:
        run()
    except KeyboardInterrupt:
        print("interrupted; every fleet and namespace started was removed", file=sys.stderr)
        sys.exit(130)


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    parser.add_argument("--rate", default="1gbit", help="tc tbf rate of each direction of each link")
    parser.add_argument("--llama-cpp", default="", help="comma-separated llama.cpp install dirs (default: the tests')")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout instead of the table")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        raise SystemExit(f"unknown mode(s) {', '.join(sorted(unknown))}: {', '.join(MODES)}")
    exit_on_sigterm()
    runs = builds(args.llama_cpp)
    weights = WeightBytes.of(read_gguf_header(bench_model(MODEL).path))
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True)) if args.json else \
        (lambda *a, **k: print(*a, **k, flush=True))
    say(f"{MODEL}: {weights.tensors:,} tensor bytes, {weights.on_rpc:,} of them on the rpc-servers; "
        f"2 CPU agents, each in its own network namespace behind a {args.rate} link (tbf, both ways)")
    for b in runs:
        say(f"{b.label}: {b.manifest.install_dir} ({', '.join(b.manifest.patch_names) or 'no patches'})")
    say("columns: first load (pre-staging s, llama-server load s, request to loaded s, rpc bytes in ÷ weights "
        "on the rpc-servers) | reload with warm caches | kill -9 → first token, idle | the same, during a generation")
    say(f"{'build':7} {'mode':8} {'round':>5} | {'stage':>6} {'load':>6} {'request':>7} {'÷ w':>7} | {'stage':>6} {'request':>7} "
        f"{'÷ w':>7} | {'idle':>6} {'÷ w':>7} | {'busy':>6} {'÷ w':>7}")
    rows: list[dict[str, Any]] = []
    with shaped_links(2, rate=args.rate) as links:
        for round_ in range(1, args.rounds + 1):
            for b in runs:
                for mode in modes:
                    with tempfile.TemporaryDirectory(prefix="prestage-link-") as tmp:
                        r = one_round(Path(tmp), links, mode, b)
                    rows.append({"build": b.label, "mode": mode, "round": round_, **r})
                    load, again, idle, busy = r["load"], r["reload"], r["idle"], r["busy"]
                    w = weights.on_rpc
                    say(f"{b.label:7} {mode:8} {round_:>5} | {load['stage_s']:>6.2f} {load['load_duration_s']:>6.2f} "
                        f"{load['request_s']:>7.2f} {load['received'] / w:>7.4f} | {again['stage_s']:>6.2f} "
                        f"{again['request_s']:>7.2f} {again['received'] / w:>7.4f} | "
                        f"{idle['s']:>6.2f} {idle['received'] / w:>7.4f} | {busy['s']:>6.2f} {busy['received'] / w:>7.4f}")
    say("where the first load's time went: wall s of placement with the controller's tensor hashes, of "
        "pre-staging and of llama-server's load; CPU s of the agents, the coordinator and the rpc-servers meanwhile")
    say(f"{'build':7} {'mode':8} {'round':>5} | {'hash+place':>10} {'stage':>6} {'load':>6} | {'agents':>6} "
        f"{'coord':>6} {'rpc':>6} | before the load: {'pull s':>6} {'then staged s':>13}")
    for row in rows:
        load = row["load"]
        say(f"{row['build']:7} {row['mode']:8} {row['round']:>5} | {load['hash_place_s']:>10.2f} {load['stage_s']:>6.2f} "
            f"{load['load_duration_s']:>6.2f} | {load['agents_cpu_s']:>6.2f} {load['coordinator_cpu_s']:>6.2f} "
            f"{load['rpc_servers_cpu_s']:>6.2f} | {'':16} {load['pull_s']:>6.2f} {load['stage_after_pull_s']:>13.2f}")
    medians: dict[str, dict[str, dict[str, float]]] = {}  # build → mode → key → median
    for b in runs:
        for mode in modes:
            of_mode = [r for r in rows if r["build"] == b.label and r["mode"] == mode]
            medians.setdefault(b.label, {})[mode] = {
                "load_request_s": statistics.median(r["load"]["request_s"] for r in of_mode),
                "reload_request_s": statistics.median(r["reload"]["request_s"] for r in of_mode),
                "idle_s": statistics.median(r["idle"]["s"] for r in of_mode),
                "busy_s": statistics.median(r["busy"]["s"] for r in of_mode)}
    # build → "baseline ÷ pre-staged mode" → key → baseline's median ÷ that mode's
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for build, by_mode in medians.items():
        for baseline in ("network", "uncached"):
            for prestaged in ("staged", "pulled"):
                if baseline not in by_mode or prestaged not in by_mode:
                    continue
                mine, theirs = by_mode[baseline], by_mode[prestaged]
                ratio = ratios.setdefault(build, {})[f"{baseline} ÷ {prestaged}"] = {
                    key: mine[key] / theirs[key] for key in theirs}
                say(f"{build}, {baseline} ÷ {prestaged}, medians: first load {ratio['load_request_s']:.2f}× "
                    f"({mine['load_request_s']:.2f} s vs {theirs['load_request_s']:.2f} s; target ≥ 5×), reload "
                    f"{ratio['reload_request_s']:.2f}× ({mine['reload_request_s']:.2f} s vs "
                    f"{theirs['reload_request_s']:.2f} s); kill → first token idle {mine['idle_s']:.2f} s vs "
                    f"{theirs['idle_s']:.2f} s, during a generation {mine['busy_s']:.2f} s vs {theirs['busy_s']:.2f} s")
    if args.json:
        print(json.dumps({"model": MODEL, "rate": args.rate, "weights": vars(weights),
                          "builds": {b.label: str(b.manifest.install_dir) for b in runs}, "rows": rows,
                          "medians": medians, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
