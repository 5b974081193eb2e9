"""Emulated links for the benchmarks and tests: each worker in a network namespace of its own,
behind a rate-limited veth pair to a hub namespace that routes between all of them.

    root namespace (controller, the bench)    hub lfbench-PID-hub (ip_forward)    worker lfbench-PID-wI
    lfbPIDh 198.18.B.253/30 ── veth ── 198.18.B.254 │ lfbPIDwI 198.18.B.(4I+1)/30 ── veth, tbf ── uplink .(4I+2)/30

Both ends of every worker's pair get `tc qdisc add dev X root tbf rate RATE burst 256kb latency
50ms`, so each direction is limited to RATE (sch_netem is not on these machines; tbf is). Each
worker has a link of its own, as on a switch. The hub forwards between the links (forwarding is
a setting of each namespace, so the root namespace's stays as it was): workers reach each other,
as a coordinator on one worker reaches the others' rpc-servers, and the root namespace reaches
every worker through one route. `Link.set_up(False)` cuts one worker off from everyone: no RST,
no FIN, packets just stop, as when a cable is pulled.

The addresses are 198.18.0.0/15, the range RFC 2544 reserves for benchmarks: the root namespace
gets one /30 and one /24 route through the hub, and nothing else changes. Everything is removed
on the way out (an exception, Ctrl-C, SIGTERM): first the processes still inside each namespace,
then the namespaces, which take their veth pairs with them. Namespaces left by a bench that was
killed with SIGKILL are removed by the next run (their names carry the dead bench's pid).

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
_OURS = re.compile(rf"^{PREFIX}-(\d+)-(?:w\d+|hub)$")
TERM_GRACE_S = 10.0


@dataclass(frozen=True)
class Link:
    namespace: str
    hub: str  # the namespace of the link's other end
    hub_device: str
    hub_address: str  # the hub's end: the worker's route to everyone else
    worker_address: str  # inside the namespace: the agent's gRPC address and its rpc-server's

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)

    def set_up(self, up: bool) -> None:
        """Connect (True) or cut (False) this worker's link, at the hub's end."""
        _ip("-n", self.hub, "link", "set", self.hub_device, "up" if up else "down")


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _tc(*args: str) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


def _sysctl(namespace: str, setting: str) -> None:
    key, value = setting.split("=")
    done = subprocess.run(["ip", "netns", "exec", namespace, "sh", "-c",
                           f"echo {value} > /proc/sys/{key.replace('.', '/')}"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{setting} in {namespace}: {done.stderr.strip()}")


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
    """`count` worker namespaces, each linked to the hub at `rate` both ways."""
    if os.geteuid() != 0:
        raise SystemExit("the emulated link needs root (ip netns, tc)")
    if count > 63:
        raise ValueError("at most 63 links (one /24 of /30s)")
    remove_stale()
    pid = os.getpid()
    block = _free_block()
    hub, uplink = f"{PREFIX}-{pid}-hub", f"lfb{pid}h"
    hub_end = f"198.18.{block}.254"
    namespaces: list[str] = []
    links: list[Link] = []
    try:
        _ip("netns", "add", hub)
        namespaces.append(hub)
        _ip("-n", hub, "link", "set", "lo", "up")
        _sysctl(hub, "net.ipv4.ip_forward=1")
        _ip("link", "add", uplink, "type", "veth", "peer", "name", "root", "netns", hub)
        _ip("addr", "add", f"198.18.{block}.253/30", "dev", uplink)
        _ip("link", "set", uplink, "up")
        _ip("-n", hub, "addr", "add", f"{hub_end}/30", "dev", "root")
        _ip("-n", hub, "link", "set", "root", "up")
        _ip("route", "add", f"198.18.{block}.0/24", "via", hub_end, "dev", uplink)
        for i in range(count):
            link = Link(f"{PREFIX}-{pid}-w{i}", hub, f"lfb{pid}w{i}", f"198.18.{block}.{4 * i + 1}",
                        f"198.18.{block}.{4 * i + 2}")
            _ip("netns", "add", link.namespace)
            namespaces.insert(0, link.namespace)  # emptied before the hub goes
            links.append(link)
            _ip("-n", hub, "link", "add", link.hub_device, "type", "veth", "peer", "name", "uplink",
                "netns", link.namespace)
            _ip("-n", hub, "addr", "add", f"{link.hub_address}/30", "dev", link.hub_device)
            _ip("-n", hub, "link", "set", link.hub_device, "up")
            _ip("-n", link.namespace, "addr", "add", f"{link.worker_address}/30", "dev", "uplink")
            _ip("-n", link.namespace, "link", "set", "uplink", "up")
            _ip("-n", link.namespace, "link", "set", "lo", "up")
            _ip("-n", link.namespace, "route", "add", "default", "via", link.hub_address)
            shape = ("root", "tbf", "rate", rate, "burst", burst, "latency", latency)
            _tc("-n", hub, "qdisc", "add", "dev", link.hub_device, *shape)
            _tc("-n", link.namespace, "qdisc", "add", "dev", "uplink", *shape)
        yield links
    finally:
        for namespace in namespaces:
            _empty_and_delete(namespace)
        subprocess.run(["ip", "link", "del", uplink], capture_output=True)  # gone with the hub, normally


def exit_on_sigterm() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` (and the namespaces' removal) runs."""
    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
