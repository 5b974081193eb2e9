"""First load after a fresh fleet start, with pre-staging vs without (issue 15). Run by hand; prints.

Each round starts a fresh fleet (two CPU agents, empty rpc caches) and loads gemma once:
- `network`: the agents hold no model file, every weight byte crosses the rpc sockets;
- `staged`:  both agents hold the file (a symlink in --models-dir), so their agents write the
  cache entries of their share before llama-server starts.

Bytes counted: the kernel's `bytes_received` (`ss -tin`) of every established TCP socket whose
local end is an rpc-server's endpoint, read right after the model is ready and before any
generation. A coordinator's connections are new for the load, so that is everything the
rpc-servers received from it during the load: commands, tensor payloads, and the warm-up graph.
The ratio is to the model's tensor bytes (the GGUF's data section). With stock llama.cpp every
tensor of 10 MiB or less is always sent, and gemma's token embeddings stay on the coordinator's
host (only their output copy goes to the last rpc-server), so 1.0 is not the baseline either way.

    .venv/bin/python bench/prestage.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ollama  # noqa: E402

from llamafleet.common.llamacpp.install import adopt_install  # noqa: E402
from llamafleet.controller.gguf import read_gguf_header  # noqa: E402
from tests.integration.agent.harness import wait_for  # noqa: E402
from tests.integration.controller.harness import Fleet, running_fleet  # noqa: E402

LIMITS = ("260MiB", "300MiB")  # gemma needs both; the second (more room) holds the output layer
_RECEIVED = re.compile(r"bytes_received:(\d+)")


def received_bytes(endpoint: str) -> int:
    """Sum of bytes_received over the established sockets whose local address is `endpoint`."""
    host, port = endpoint.rsplit(":", 1)
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's first line: local and peer address
            fields = line.split()
            mine = len(fields) >= 3 and fields[2] == f"{host}:{port}"
        elif mine and (m := _RECEIVED.search(line)):
            total += int(m.group(1))
    return total


def one_round(workdir: Path, llama_cpp_dir: Path, model: Path, staged: bool) -> dict[str, float]:
    store = workdir / "store"
    store.mkdir(parents=True)
    (store / "gemma.gguf").symlink_to(model)
    holder = ("--models-dir", str(store)) if staged else ()
    with running_fleet(workdir / "fleet", adopt_install(llama_cpp_dir), model, memory_limit=LIMITS,
                       agent_args=(holder, holder)) as fleet:
        if staged:
            wait_for(lambda: bool(plan_holders(fleet)), 120, "holders confirmed", interval_s=0.5)
        before = sum(received_bytes(a.rpc_endpoint) for a in fleet.agents)
        started = time.monotonic()
        ollama.Client(host=fleet.url).generate(model="gemma", prompt="")  # an empty prompt only loads
        wall = time.monotonic() - started
        after = sum(received_bytes(a.rpc_endpoint) for a in fleet.agents)
        [loaded] = fleet.ps()
        prestage = loaded.get("prestage") or {}
        return {"wall_s": wall, "load_duration_s": loaded["load_duration_s"],
                "stage_s": float(prestage.get("seconds", 0.0)), "prestaged_bytes": loaded["prestaged_bytes"],
                "received": after - before}


def plan_holders(fleet: Fleet) -> list[str]:
    result = fleet.cli("plan", "gemma", "--json")
    return json.loads(result.stdout)["holders"] if result.returncode == 0 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    llama_cpp = Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"])
    model = Path(os.environ["LLAMAFLEET_TEST_MODEL"])
    header = read_gguf_header(model)
    weights = sum(t.n_bytes for t in header.tensors)
    print(f"model {model.name}: {weights:,} tensor bytes; 2 CPU agents capped at {', '.join(LIMITS)}")
    print(f"{'mode':8} {'round':>5} {'stage s':>8} {'load s':>7} {'request s':>9} {'rpc bytes in':>14} "
          f"{'÷ weights':>9} {'pre-staged':>12}")
    for round_ in range(1, args.rounds + 1):
        for staged in (False, True):  # alternating, so drift on this shared machine hits both
            with tempfile.TemporaryDirectory(prefix="prestage-bench-") as tmp:
                r = one_round(Path(tmp), llama_cpp, model, staged)
            print(f"{'staged' if staged else 'network':8} {round_:>5} {r['stage_s']:>8.2f} {r['load_duration_s']:>7.2f} "
                  f"{r['wall_s']:>9.2f} {int(r['received']):>14,} {r['received'] / weights:>9.3f} "
                  f"{int(r['prestaged_bytes']):>12,}")


if __name__ == "__main__":
    main()
