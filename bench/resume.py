"""The pause a client sees when a worker dies mid-answer, and whether the answer survives (issue 17). Run by hand.

One fleet of three CPU agents on loopback (gemma-3-270m, agents capped so that the model needs
two of them: the third is a spare), streaming `/api/generate` at temperature 0 (a counting
prompt, whose greedy answer has no near-ties: see tests/integration/faults/test_resume.py).
First one uninterrupted answer, then rounds in which something is killed after a random number
of pieces:
- `rpc-kill`: SIGKILL to one backend's rpc-server (its agent restarts it; the coordinator is
  restarted over the same nodes);
- `worker-lost`: SIGKILL to one backend's agent, which takes its rpc-server with it (the model is
  re-placed on the spare; the lost agent is started again after the round, as the next spare).

For each round: the longest wait between two NDJSON lines (the pause), whether the stream ended
with the whole answer (`done`, every token), whether it is the uninterrupted answer, and the
round's time ÷ the uninterrupted answer's time, side by side in one run.

    .venv/bin/python bench/resume.py [--kills 5] [--losses 2] [--tokens 160] [--seed S] [--json]

Needs LLAMAFLEET_TEST_LLAMA_CPP and LLAMAFLEET_TEST_MODEL (scripts/test.sh prepares both).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamafleet.common.llamacpp.install import read_manifest  # noqa: E402
from tests.integration.agent.harness import RunningAgent, wait_for  # noqa: E402
from tests.integration.controller.harness import Fleet, running_fleet  # noqa: E402

PROMPT = "Count from 1 to 500, one number after another: 1, 2, 3, 4,"


def answer(fleet: Fleet, tokens: int, kill_after: int | None = None,
           kill: Any = None) -> dict[str, Any]:
    body = {"model": "gemma", "prompt": PROMPT, "raw": True,
            "options": {"num_predict": tokens, "temperature": 0, "seed": 3}}
    parsed = urllib.parse.urlsplit(fleet.url)
    assert parsed.hostname is not None, parsed
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=300)
    started = last = time.monotonic()
    docs: list[dict[str, Any]] = []
    pause = 0.0
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        for line in conn.getresponse():
            if not line.strip():
                continue
            now = time.monotonic()
            pause, last = max(pause, now - last), now
            docs.append(json.loads(line))
            if kill_after is not None and len(docs) == kill_after:
                kill()
    finally:
        conn.close()
    final = docs[-1] if docs else {}
    return {"text": "".join(d.get("response", "") for d in docs), "seconds": time.monotonic() - started,
            "pause_s": pause, "complete": bool(final.get("done")) and final.get("eval_count") == tokens,
            "resumed": final.get("resumed", 0), "error": final.get("error", "")}


def backend_agents(fleet: Fleet) -> list[int]:
    backends = fleet.ps()[0]["backends"]
    return [i for i, agent in enumerate(fleet.agents) if agent.rpc_endpoint in backends]


def ready(fleet: Fleet) -> bool:
    ps = fleet.ps()
    return bool(ps) and ps[0]["state"] == "ready"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="rounds with an rpc-server killed")
    parser.add_argument("--losses", type=int, default=2, help="rounds with a whole worker lost")
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    manifest = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"]))
    model = Path(os.environ["LLAMAFLEET_TEST_MODEL"])
    rng = random.Random(args.seed)
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lf-resume-") as tmp, \
            running_fleet(Path(tmp), manifest, model, agents=3) as fleet:
        whole = answer(fleet, args.tokens)
        assert whole["complete"], whole
        plan = ["rpc-kill"] * args.kills + ["worker-lost"] * args.losses
        for mode in plan:
            wait_for(lambda: ready(fleet), 120, "the model ready before the round")
            victim = rng.choice(backend_agents(fleet))
            at = rng.randint(3, args.tokens - 10)
            agent = fleet.agents[victim]

            def kill(agent: RunningAgent = agent, mode: str = mode) -> None:
                if mode == "rpc-kill":
                    os.kill(agent.rpc().pid, signal.SIGKILL)
                else:
                    agent.proc.kill()
            result = answer(fleet, args.tokens, at, kill)
            if mode == "worker-lost":
                agent.proc.wait()
                agent.start_again()
                back = agent.address
                wait_for(lambda: fleet.node(back)["state"] == "ready", 60, "the lost worker back")  # noqa: B023
            rounds.append({"mode": mode, "kill_after": at, "agent": victim, "same": result["text"] == whole["text"],
                           "time_ratio": result["seconds"] / whole["seconds"],
                           **{k: v for k, v in result.items() if k != "text"}})
            print(f"{mode:11s} after {at:3d} pieces: pause {result['pause_s']:5.1f} s, complete {result['complete']}, "
                  f"same {rounds[-1]['same']}, {rounds[-1]['time_ratio']:.2f}x the uninterrupted time"
                  f"{', error: ' + result['error'] if result['error'] else ''}", flush=True)
    summary = {}
    for mode in ("rpc-kill", "worker-lost"):
        done = [r for r in rounds if r["mode"] == mode]
        if done:
            pauses = [r["pause_s"] for r in done]
            summary[mode] = {"rounds": len(done), "pause_median_s": round(statistics.median(pauses), 2),
                             "pause_max_s": round(max(pauses), 2),
                             "complete_share": sum(r["complete"] for r in done) / len(done),
                             "same_share": sum(r["same"] for r in done) / len(done),
                             "time_ratio_median": round(statistics.median(r["time_ratio"] for r in done), 2)}
    doc = {"seed": args.seed, "tokens": args.tokens, "uninterrupted_s": round(whole["seconds"], 2),
           "summary": summary, "rounds": rounds}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"\nuninterrupted: {whole['seconds']:.1f} s for {args.tokens} tokens (seed {args.seed})")
        print("| fault | rounds | pause median s | pause max s | complete | same answer | time ÷ uninterrupted |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for mode, s in summary.items():
            print(f"| {mode} | {s['rounds']} | {s['pause_median_s']} | {s['pause_max_s']} | "
                  f"{s['complete_share']:.0%} | {s['same_share']:.0%} | {s['time_ratio_median']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
