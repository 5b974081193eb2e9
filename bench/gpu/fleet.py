"""Processes the GPU benchmarks start and talk to: llama-server, ggml-rpc-server, agents, controller.

Every process is started in its own session with its output in a log file, and stopped by its
process group (SIGTERM, then SIGKILL). HTTP is plain urllib so that the only dependencies are
llamafleet's own. Nothing here is imported by the test suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


class BenchError(RuntimeError):
    """A step of a benchmark failed; the message says which and why (with a log tail)."""


@dataclass
class Proc:
    """A started process, its log file, and when it was started."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log, for error messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the process group, SIGKILL it if it is still there after `timeout_s`."""
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.popen.wait(10)


def start(name: str, argv: Sequence[str], logdir: Path, env: dict[str, str] | None = None) -> Proc:
    """Start `argv` in a new session, stdout and stderr to `logdir/name.log`."""
    logdir.mkdir(parents=True, exist_ok=True)
    log = logdir / f"{name}.log"
    with log.open("ab") as handle:
        handle.write(f"$ {' '.join(argv)}\n".encode())
        handle.flush()
        popen = subprocess.Popen(
            list(argv), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
    return Proc(name, popen, log, time.monotonic())


def http_json(method: str, url: str, body: dict[str, Any] | None = None, timeout_s: float = 600.0) -> Any:
    """One HTTP request with a JSON body and a JSON reply; BenchError on any failure."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise BenchError(f"{method} {url}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"{method} {url}: {exc}") from exc


def wait_until(check: Any, what: str, timeout_s: float, proc: Proc | None = None, interval_s: float = 0.1) -> float:
    """Poll `check()` until it is truthy; return the seconds since `proc` started (or since now)."""
    begin = proc.started if proc else time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(f"{proc.name} exited with code {proc.popen.returncode} while waiting for {what}:\n"
                             f"{proc.tail()}")
        if check():
            return time.monotonic() - begin
        time.sleep(interval_s)
    tail = f":\n{proc.tail()}" if proc else ""
    raise BenchError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")


def http_ok(url: str) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        # Not up yet (connection refused) or still loading (503).
        return False


def tcp_open(port: int, host: str = LOOPBACK) -> bool:
    """True when something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def median(values: Sequence[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


# ---- llama.cpp processes --------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaCpp:
    """An install directory with bin/llama-server and bin/ggml-rpc-server (or bin/rpc-server)."""

    root: Path

    @property
    def llama_server(self) -> Path:
        """bin/llama-server of the install."""
        return self.root / "bin" / "llama-server"

    @property
    def rpc_server(self) -> Path:
        """bin/ggml-rpc-server (or the older name, bin/rpc-server) of the install."""
        for name in ("ggml-rpc-server", "rpc-server"):
            if (self.root / "bin" / name).exists():
                return self.root / "bin" / name
        raise BenchError(f"no rpc-server in {self.root / 'bin'}")


def start_rpc_server(llama: LlamaCpp, port: int, logdir: Path, cache_dir: Path | None = None) -> Proc:
    """A bare ggml-rpc-server on loopback (no agent), with `-c` when `cache_dir` is given."""
    argv = [str(llama.rpc_server), "-H", LOOPBACK, "-p", str(port)]
    env = dict(os.environ)
    if cache_dir is not None:
        argv.append("-c")
        env["LLAMA_CACHE"] = str(cache_dir)
    proc = start(f"rpc-server-{port}", argv, logdir, env)
    wait_until(lambda: tcp_open(port), f"rpc-server on port {port}", 60, proc)
    return proc


@dataclass
class LlamaServer:
    """A running llama-server and how long it took to answer /health with 200 (the load)."""

    proc: Proc
    url: str
    load_s: float
    argv: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the server (its process group)."""
        self.proc.stop()


def start_llama_server(llama: LlamaCpp, name: str, model: Path, port: int, args: Sequence[str], logdir: Path,
                       env: dict[str, str] | None = None, timeout_s: float = 300.0) -> LlamaServer:
    """Start llama-server and wait until the model is loaded; `load_s` is spawn → /health 200."""
    argv = [str(llama.llama_server), "-m", str(model), "--host", LOOPBACK, "--port", str(port), *args]
    proc = start(name, argv, logdir, env)
    url = f"http://{LOOPBACK}:{port}"
    try:
        load_s = wait_until(lambda: http_ok(f"{url}/health"), f"{name} to load the model", timeout_s, proc, 0.05)
    except BenchError:
        proc.stop()
        raise
    return LlamaServer(proc, url, load_s, argv)


def words_prompt(n_tokens: int, words: int, seed: int) -> str:
    """A prompt of exactly `n_tokens` tokens with the benchmark vocabulary (BOS + one per word)."""
    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(words)}" for _ in range(n_tokens - 1))


def complete(url: str, prompt: str, n_predict: int, seed: int = 1) -> dict[str, Any]:
    """POST /completion (greedy, fixed seed, no prompt cache, EOS ignored); returns its `timings`,
    with `text_sha256` added: the answer's fingerprint, for comparing what two paths generated."""
    reply = http_json("POST", f"{url}/completion", {
        "prompt": prompt, "n_predict": n_predict, "temperature": 0, "seed": seed,
        "ignore_eos": True, "cache_prompt": False,
    })
    timings = reply.get("timings")
    if not isinstance(timings, dict):
        raise BenchError(f"{url}/completion answered without timings: {str(reply)[:300]}")
    text = reply.get("content")
    return timings | {"text_sha256": hashlib.sha256(str(text).encode()).hexdigest()}


# ---- llamafleet processes -------------------------------------------------------------------


def llamafleet_bin(name: str) -> str:
    """The llamafleet console script beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} not found (install llamafleet, or put its scripts on PATH)")
    return found


def run_cli(argv: Sequence[str], timeout_s: float = 60.0) -> str:
    """Run a llamafleet command, return stdout; BenchError with its stderr on failure."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{' '.join(argv)} timed out after {timeout_s} s") from exc
    if result.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()[-800:]}")
    return result.stdout


@dataclass(frozen=True)
class AgentSpec:
    """One agent of the benchmark: its gRPC port, its rpc-server port, its folders."""

    name: str
    listen_port: int
    rpc_port: int

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.listen_port}"

    @property
    def rpc_endpoint(self) -> str:
        return f"{LOOPBACK}:{self.rpc_port}"


def agent_status(address: str, token_file: Path) -> dict[str, Any]:
    """`llamafleet-agent status --json` of the agent at `address`."""
    out = run_cli([llamafleet_bin("llamafleet-agent"), "status", "--address", address,
                   "--token-file", str(token_file), "--json"], timeout_s=30)
    return json.loads(out)


def start_agent(spec: AgentSpec, llama: LlamaCpp, workdir: Path, token_file: Path, memory_limit: str,
                rpc_cache: bool, logdir: Path, extra_args: Sequence[str] = ()) -> Proc:
    """`llamafleet-agent serve` adopting `llama`; waits until its rpc-server is running."""
    state = workdir / f"{spec.name}-state"
    cache = workdir / f"{spec.name}-cache"
    state.mkdir(parents=True, exist_ok=True)
    argv = [
        llamafleet_bin("llamafleet-agent"), "serve", "--listen", spec.address, "--token-file", str(token_file),
        "--rpc-host", LOOPBACK, "--rpc-port", str(spec.rpc_port), "--state-dir", str(state),
        "--cache-dir", str(cache), "--llama-cpp", str(llama.root),
        "--rpc-cache" if rpc_cache else "--no-rpc-cache",
    ]
    if memory_limit:
        argv += ["--memory-limit", memory_limit]
    argv += list(extra_args)
    proc = start(spec.name, argv, logdir)

    def running() -> bool:
        if not tcp_open(spec.listen_port):
            return False
        try:
            return agent_status(spec.address, token_file)["rpc_server"]["state"] == "running"
        except (BenchError, KeyError, json.JSONDecodeError):
            # Still starting: the next poll asks again.
            return False

    wait_until(running, f"{spec.name} with a running rpc-server", 120, proc, 0.5)
    return proc


def write_token(path: Path) -> Path:
    """A fresh random bearer token for the agents and the controller (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(os.urandom(24).hex() + "\n")
    path.chmod(0o600)
    return path


def nvidia_smi() -> list[dict[str, Any]]:
    """Per GPU: index, name, memory total/used/free in MiB, as nvidia-smi prints them."""
    fields = "index,name,uuid,memory.total,memory.used,memory.free,driver_version"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    gpus = []
    for line in out.strip().splitlines():
        index, name, uuid, total, used, free, driver = (part.strip() for part in line.split(","))
        gpus.append({"index": int(index), "name": name, "uuid": uuid, "total_mib": int(total),
                     "used_mib": int(used), "free_mib": int(free), "driver": driver})
    return gpus


def first_gpu() -> dict[str, Any]:
    """nvidia-smi's facts of GPU 0 for a report; on a CPU machine (trying a bench out), a name
    that says there is none."""
    try:
        return nvidia_smi()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return {"name": f"no GPU ({exc.__class__.__name__})"}
