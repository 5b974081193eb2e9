"""Agent footprint while idle: RSS and CPU of `llamafleet-agent serve` over a quiet minute.

One watcher holds a WatchStatus stream with a 1 s heartbeat (what the controller does), the
rpc-server runs, nothing else happens. Targets (issue: agent): RSS <= 60 MB, CPU <= 1% of a core.

    .venv/bin/python bench/agent_idle.py --llama-cpp DIR [--seconds 60]

DIR defaults to $LLAMAFLEET_TEST_LLAMA_CPP (set by scripts/test.sh's set-up).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil

from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc

RSS_TARGET_MB = 60.0
CPU_TARGET_PERCENT = 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMAFLEET_TEST_LLAMA_CPP"))
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    if not args.llama_cpp:
        parser.error("--llama-cpp DIR (or LLAMAFLEET_TEST_LLAMA_CPP) is required")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        listen = f"127.0.0.1:{free_loopback_port()}"
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / "llamafleet-agent"), "serve", "--listen", listen,
             "--state-dir", str(state), "--llama-cpp", str(args.llama_cpp), "--rpc-port", str(free_loopback_port()),
             "--heartbeat-interval-s", "1", "--log-level", "warning"],
        )
        try:
            return measure(agent, listen, state, args.seconds)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)


def measure(agent: subprocess.Popen[bytes], listen: str, state: Path, seconds: float) -> int:
    deadline = time.monotonic() + 30
    while not (state / "token").exists():
        if time.monotonic() > deadline or agent.poll() is not None:
            raise SystemExit("agent did not start")
        time.sleep(0.1)
    metadata = [("authorization", f"Bearer {(state / 'token').read_text().strip()}")]
    channel = grpc.insecure_channel(listen)
    stub = pb_grpc.AgentServiceStub(channel)
    grpc.channel_ready_future(channel).result(timeout=30)
    while stub.GetStatus(pb.GetStatusRequest(), metadata=metadata).status.rpc_server.state != pb.RPC_SERVER_STATE_RUNNING:
        time.sleep(0.2)
    heartbeats = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal heartbeats
        stream = stub.WatchStatus(pb.WatchStatusRequest(heartbeat_interval_ms=1000), metadata=metadata)
        for _ in stream:
            heartbeats += 1
            if stop.is_set():
                stream.cancel()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(2)  # let start-up work settle before measuring
    proc = psutil.Process(agent.pid)
    cpu_before = proc.cpu_times()
    started = time.monotonic()
    beats_before = heartbeats
    rss_peak = 0
    while time.monotonic() - started < seconds:
        rss_peak = max(rss_peak, proc.memory_info().rss)
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    cpu_after = proc.cpu_times()
    stop.set()
    cpu_s = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    cpu_percent = 100 * cpu_s / elapsed
    rss_mb = rss_peak / 1e6
    print(f"agent idle for {elapsed:.0f} s with a 1 s heartbeat ({heartbeats - beats_before} heartbeats received)")
    print(f"  RSS peak   {rss_mb:6.1f} MB   target <= {RSS_TARGET_MB:.0f} MB   ratio {rss_mb / RSS_TARGET_MB:.2f}")
    print(f"  CPU        {cpu_percent:6.2f} %    target <= {CPU_TARGET_PERCENT:.0f} %    ratio {cpu_percent / CPU_TARGET_PERCENT:.2f}")
    ok = rss_mb <= RSS_TARGET_MB and cpu_percent <= CPU_TARGET_PERCENT
    print("  within target" if ok else "  OVER TARGET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
