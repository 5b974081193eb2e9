"""Emulated links for the benchmarks: each worker in a network namespace behind a rate-limited veth pair.

    root namespace (controller, coordinator, the bench)          namespace lfbench-PID-wI (agent I, its rpc-servers)
    lfbPIDwI 198.18.B.(4I+1)/30  ── veth, tbf both ways ──  uplink 198.18.B.(4I+2)/30

Both ends of every pair get `tc qdisc add dev X root tbf rate RATE burst 256kb latency 50ms`, so
the coordinator's sends and the worker's replies are each limited to RATE (sch_netem is not on
these machines; tbf is). Each worker has a link of its own, as on a switch; the coordinator's
side is not one shared port, which changes nothing for a load: llama.cpp sets one tensor at a
time, so one link carries the load at any moment.

The addresses are 198.18.0.0/15, the range RFC 2544 reserves for benchmarks: the root namespace
gets one /30 route per worker and nothing else changes. Everything is removed on the way out
(an exception, Ctrl-C, SIGTERM): first the processes still inside each namespace, then the
namespace, which takes its veth pair with it. Namespaces left by a bench that was killed with
SIGKILL are removed by the next run (their names carry the dead bench's pid).

Needs root (`ip netns`, `tc`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PREFIX = "lfbench"
_OURS = re.compile(rf"^{PREFIX}-(\d+)-w\d+$")
TERM_GRACE_S = 10.0


@dataclass(frozen=True)
class Link:
    namespace: str
    host_device: str
    host_address: str  # the root namespace's end: what the worker sees the coordinator as
    worker_address: str  # inside the namespace: the agent's gRPC address and its rpc-server's

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _empty_and_delete(namespace: str) -> None:
    """End the processes inside `namespace` (ours: this bench started them there), then delete it."""
    def inside() -> list[int]:
        try:
            return [int(p) for p in _ip("netns", "pids", namespace).split()]
        except RuntimeError:
            return []

    for sig, wait_s in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, 5.0)):
        pids = inside()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while inside() and time.monotonic() < deadline:
            time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def remove_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose bench process is gone; their names."""
    removed = []
    for name in _namespaces():
        m = _OURS.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _empty_and_delete(name)
            removed.append(name)
    return removed


def _free_block() -> int:
    """A third octet B such that no address 198.18.B.x is configured in the root namespace."""
    used = set(re.findall(r"198\.18\.(\d+)\.", _ip("-o", "addr")))
    for offset in range(256):
        block = (os.getpid() + offset) % 256
        if str(block) not in used:
            return block
    raise RuntimeError("every 198.18.B.0/24 block is in use in the root namespace")


@contextmanager
def shaped_links(count: int, rate: str = "1gbit", burst: str = "256kb", latency: str = "50ms") -> Iterator[list[Link]]:
    """`count` worker namespaces, each linked to the root namespace at `rate` both ways."""
    if os.geteuid() != 0:
        raise SystemExit("the emulated link needs root (ip netns, tc)")
    if count > 63:
        raise ValueError("at most 63 links (one /24 of /30s)")
    remove_stale()
    pid = os.getpid()
    block = _free_block()
    links: list[Link] = []
    try:
        for i in range(count):
            link = Link(f"{PREFIX}-{pid}-w{i}", f"lfb{pid}w{i}", f"198.18.{block}.{4 * i + 1}",
                        f"198.18.{block}.{4 * i + 2}")
            _ip("netns", "add", link.namespace)
            links.append(link)
            _ip("link", "add", link.host_device, "type", "veth", "peer", "name", "uplink", "netns", link.namespace)
            _ip("addr", "add", f"{link.host_address}/30", "dev", link.host_device)
            _ip("link", "set", link.host_device, "up")
            _ip("-n", link.namespace, "addr", "add", f"{link.worker_address}/30", "dev", "uplink")
            _ip("-n", link.namespace, "link", "set", "uplink", "up")
            _ip("-n", link.namespace, "link", "set", "lo", "up")
            shape = ("root", "tbf", "rate", rate, "burst", burst, "latency", latency)
            _tc("qdisc", "add", "dev", link.host_device, *shape)
            _tc("-n", link.namespace, "qdisc", "add", "dev", "uplink", *shape)
        yield links
    finally:
        for link in links:
            _empty_and_delete(link.namespace)
            subprocess.run(["ip", "link", "del", link.host_device], capture_output=True)  # gone with it, normally


def exit_on_sigterm() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` (and the namespaces' removal) runs."""
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
