"""Loads over RPC with warm caches: stock vs patched coordinator, and llamafleet vs a local load (issue 16).

A synthetic llama-shaped Q8_0 model (`bench/gpu/make_model.py --shape llama-2g`, about 2.1 GB,
its large tensors above llama.cpp's 10 MiB hash threshold) is split over two CPU rpc-servers
started with `-c` on 127.0.0.2 and 127.0.0.3, their caches warmed by one load first. Then, in
alternating rounds (drift on a shared machine hits every mode alike):

- `stock`:   llama-server from the stock build (`--no-patches`): hashes every weight tensor;
- `patched`: llama-server from the patched build, with the controller's pre-computed hashes
             ($LLAMA_RPC_TENSOR_HASHES, made by controller/tensor_hashes.py);
- `local`:   llama-server on this host's CPU alone, with mmap (the weights are not copied at
             all) and with `--load-mode none` (read into memory, as a GPU upload would);
- `fleet`:   llamafleet (patched build), two agents on 127.0.0.2/3 holding the file, warm
             caches: the time from the request to the model being ready (`load_duration_s`).

Per mode: the load time (spawn to /health 200) and the coordinator's CPU seconds at that moment
(utime + stime from /proc). Prints the ratios patched ÷ stock (CPU; target ≤ 0.2) and fleet ÷
local (time).

    .venv/bin/python bench/load_speed.py [--rounds 3] [--model PATH] [--json OUT]

Needs LLAMAFLEET_TEST_LLAMA_CPP (patched) and LLAMAFLEET_TEST_LLAMA_CPP_STOCK, as scripts/test.sh sets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ollama  # noqa: E402

from llamafleet.common.llamacpp.install import Manifest, read_manifest  # noqa: E402
from llamafleet.controller.gguf import read_gguf_header  # noqa: E402
from llamafleet.controller.tensor_hashes import TensorHashes  # noqa: E402
from tests.integration.agent.harness import wait_for  # noqa: E402
from tests.integration.controller.harness import running_fleet  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "llamafleet-bench" / "llama-2g-q8_0.gguf"
HOSTS = ("127.0.0.2", "127.0.0.3")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@contextmanager
def rpc_servers(build: Manifest, workdir: Path) -> Iterator[list[str]]:
    procs, endpoints = [], []
    try:
        for i, host in enumerate(HOSTS):
            port = free_port(host)
            cache = workdir / f"cache{i}"
            cache.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "LLAMA_CACHE": str(cache)}
            log = (workdir / f"rpc{i}.log").open("wb")
            procs.append(subprocess.Popen([build.rpc_server, "-H", host, "-p", str(port), "-c"], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
            endpoints.append(f"{host}:{port}")
        for endpoint in endpoints:
            host, port_text = endpoint.split(":")
            wait_for(lambda: _connects(host, int(port_text)), 30, f"rpc-server {endpoint}")  # noqa: B023
        yield endpoints
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def one_load(build: Manifest, model: Path, endpoints: list[str] | None, log: Path, *,
             hashes: Path | None = None, mmap: bool = True) -> dict[str, float]:
    port = free_port()
    argv = [build.llama_server, "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", "512", "--parallel", "1", "--no-webui"]
    if endpoints:
        argv += ["--rpc", ",".join(endpoints), "--device", ",".join(f"RPC{i}" for i in range(len(endpoints))),
                 "--tensor-split", ",".join("1" for _ in endpoints), "--n-gpu-layers", "99", "--fit", "off"]
    else:
        argv += ["--device", "none", "--n-gpu-layers", "0"]
    if not mmap:
        argv += ["--load-mode", "none"]  # read into memory (this llama.cpp has no --no-mmap)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_") and k != "LLAMA_RPC_TENSOR_HASHES"}
    if hashes is not None:
        env["LLAMA_RPC_TENSOR_HASHES"] = str(hashes)
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        while not healthy(port):
            if proc.poll() is not None:
                raise SystemExit(f"llama-server exited ({proc.returncode}); see {log}")
            if time.monotonic() - started > 600:
                raise SystemExit(f"llama-server not ready after 600 s; see {log}")
            time.sleep(0.02)
        return {"load_s": time.monotonic() - started, "cpu_s": cpu_seconds(proc.pid)}
    finally:
        proc.terminate()
        proc.wait()


def fleet_loads(patched: Manifest, model: Path, workdir: Path, rounds: int) -> list[dict[str, float]]:
    """llamafleet over two agents holding the file: the first load stages, the later ones are warm."""
    store = workdir / "store"
    store.mkdir()
    (store / "big.gguf").symlink_to(model)
    holder = ("--models-dir", str(store))
    results = []
    # The coordinator stays on this host: this measures loads over RPC onto holders (issue 16).
    with running_fleet(workdir / "fleet", patched, model, memory_limit="4GiB", model_names=("big",),
                       agent_args=(holder, holder), controller_args=("--coordinator", "controller")) as fleet:
        def holders() -> bool:
            out = fleet.cli("plan", "big", "--json")
            if out.returncode != 0:
                return False
            plan = json.loads(out.stdout)
            # Every node of the plan holds the file (once all sides have hashed it).
            return bool(plan["holders"]) and len(plan["holders"]) == len({a["node"] for a in plan["assignments"]})

        wait_for(holders, 300, "the plan's nodes confirmed as holders", interval_s=1)
        client = ollama.Client(host=fleet.url, timeout=900)
        for i in range(rounds + 1):
            client.generate(model="big", prompt="", keep_alive="10m")
            [loaded] = fleet.ps()
            results.append({"load_s": float(loaded["load_duration_s"]), "first": i == 0})
            client.generate(model="big", prompt="", keep_alive=0)
            wait_for(lambda: not fleet.ps(), 60, "unloaded")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    patched = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP"]))
    stock = read_manifest(Path(os.environ["LLAMAFLEET_TEST_LLAMA_CPP_STOCK"]))
    if not args.model.exists():
        args.model.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(Path(__file__).parent / "gpu" / "make_model.py"), "--shape", "llama-2g",
                        "--out", str(args.model)], check=True)
    header = read_gguf_header(args.model)
    weights = sum(t.n_bytes for t in header.tensors)
    hashed = sum(t.n_bytes for t in header.tensors if t.n_bytes > 10 * 1024 * 1024)
    print(f"model {args.model.name}: {weights / 1e9:.2f} GB of tensors, {hashed / 1e9:.2f} GB above the hash threshold; "
          f"patches: {', '.join(patched.patch_names)}")
    results: dict[str, list[dict[str, float]]] = {"stock": [], "patched": [], "local mmap": [], "local no-mmap": []}
    with tempfile.TemporaryDirectory(prefix="load-speed-") as tmp:
        work = Path(tmp)
        started = time.monotonic()
        made = asyncio.run(TensorHashes(work / "controller").ensure(args.model, header))
        if made is None:
            raise SystemExit("could not compute the tensor hashes (no C compiler?)")
        hashes = made.path
        print(f"pre-computed the tensor hashes in {time.monotonic() - started:.2f} s (controller, in parallel)")
        with rpc_servers(patched, work) as endpoints:
            warm = one_load(stock, args.model, endpoints, work / "warm.log")
            print(f"warm-up load (caches filled): {warm['load_s']:.2f} s")
            for _ in range(args.rounds):
                results["stock"].append(one_load(stock, args.model, endpoints, work / "stock.log"))
                results["patched"].append(one_load(patched, args.model, endpoints, work / "patched.log", hashes=hashes))
                results["local mmap"].append(one_load(patched, args.model, None, work / "local.log"))
                results["local no-mmap"].append(one_load(patched, args.model, None, work / "local2.log", mmap=False))
            # (The loader's "N tensors set through pre-computed RPC hashes" shows only at -lv 4; a
            # file it refused says so as a warning.)
            refused = [w for w in ("does not describe", "cannot open", "malformed") if w in (work / "patched.log").read_text()]
            assert not refused, f"the patched coordinator ignored the hashes: {refused}"
        print("hand-started (median):", {k: {m: round(statistics.median(r[m] for r in v), 2) for m in ("load_s", "cpu_s")}
                                          for k, v in results.items()}, flush=True)
        fleet = fleet_loads(patched, args.model, work, args.rounds)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("load_s", "cpu_s")} for k, v in results.items()}
    fleet_warm = statistics.median(r["load_s"] for r in fleet if not r["first"])
    fleet_first = fleet[0]["load_s"]
    print(f"{'mode':14} {'load s':>8} {'CPU s':>8}   (median of {args.rounds})")
    for k, v in med.items():
        print(f"{k:14} {v['load_s']:>8.2f} {v['cpu_s']:>8.2f}")
    print(f"{'fleet first':14} {fleet_first:>8.2f}        (pre-staging from the agents' copy, empty caches)")
    print(f"{'fleet warm':14} {fleet_warm:>8.2f}")
    cpu_ratio = med["patched"]["cpu_s"] / med["stock"]["cpu_s"]
    print(f"coordinator CPU patched ÷ stock: {cpu_ratio:.3f} (target ≤ 0.2); "
          f"load time patched ÷ stock: {med['patched']['load_s'] / med['stock']['load_s']:.3f}")
    print(f"llamafleet warm ÷ local: {fleet_warm / med['local no-mmap']['load_s']:.2f} (vs --no-mmap), "
          f"{fleet_warm / med['local mmap']['load_s']:.2f} (vs mmap); first load ÷ local --no-mmap: "
          f"{fleet_first / med['local no-mmap']['load_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model_bytes": weights, "hashed_bytes": hashed, "median": med,
                                         "fleet_first_s": fleet_first, "fleet_warm_s": fleet_warm,
                                         "cpu_ratio_patched_vs_stock": cpu_ratio, "rounds": results}, indent=2))


if __name__ == "__main__":
    main()
