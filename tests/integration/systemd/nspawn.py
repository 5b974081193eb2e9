"""A throwaway systemd: PID 1 of a `systemd-nspawn --boot` container over a tmpfs overlay of /.

Recipe and pitfalls: bind / non-recursively onto an empty directory inside a private mount
namespace (nspawn refuses / itself), a tmpfs on /run/systemd for nspawn's scratch state,
`--register=no --keep-unit --link-journal=no` (no machined or host bus here), boot only to
basic.target (the host's enabled services stay off), and drive it with `nsenter` into PID 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

BOOT_TIMEOUT_S = 60


def cannot_boot_reason() -> str | None:
    """Why a container cannot be booted here, or None if it can."""
    if os.geteuid() != 0:
        return "booting a systemd container needs root"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (Debian package systemd-container)"
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        return "util-linux nsenter/unshare are missing"
    if not Path("/lib/systemd/systemd").exists():
        return "systemd is not installed"
    return None


@dataclass
class Container:
    name: str
    launcher: subprocess.Popen[bytes]
    pid1: int
    log_path: Path

    def run(self, command: str, *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a shell command inside the container (all its namespaces), as root."""
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "/bin/sh", "-c", command],
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"in container: {command!r} exited {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def show(self, unit: str, prop: str) -> str:
        return self.run(f"systemctl show -p {prop} --value {unit}").stdout.strip()


def _find_pid1(launcher_pid: int) -> int | None:
    try:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            if child.name() == "systemd" and child.ppid() != 1:
                return child.pid
    except psutil.NoSuchProcess:
        # The launcher died: the caller reports its log.
        return None
    return None


@contextmanager
def booted_container(work: Path, binds_ro: list[tuple[Path, str]] | None = None) -> Iterator[Container]:
    name = f"lf{os.getpid() % 100000}"
    rootbind = work / "rootbind"
    rootbind.mkdir(parents=True)
    log_path = work / "nspawn.log"
    binds = " ".join(f"--bind-ro={host}:{inside}" for host, inside in (binds_ro or []))
    script = (
        "set -e; mount --make-rprivate /; mount -t tmpfs tmpfs /run/systemd; "
        f"mount --bind / {rootbind}; "
        f"exec systemd-nspawn -D {rootbind} --volatile=overlay --private-network --register=no --keep-unit "
        f"--link-journal=no -M {name} {binds} --boot -- --unit=basic.target"
    )
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(["setsid", "unshare", "--mount", "bash", "-c", script],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        pid1 = None
        while pid1 is None:
            if launcher.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"container did not boot:\n{log_path.read_text(errors='replace')[-3000:]}")
            pid1 = _find_pid1(launcher.pid)
            time.sleep(0.1)
        container = Container(name, launcher, pid1, log_path)
        while True:
            state = container.run("systemctl is-system-running --wait", check=False, timeout=BOOT_TIMEOUT_S)
            if state.stdout.strip() in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"container never settled: {state.stdout} {state.stderr}")
            time.sleep(0.2)
        yield container
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)  # orderly poweroff
            try:
                launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
        for leftover in ("systemd/payload", "unified/payload", "systemd/supervisor", "unified/supervisor"):
            with_path = Path("/sys/fs/cgroup") / leftover
            if with_path.is_dir():
                for directory in sorted(with_path.rglob("*"), key=lambda p: -len(p.parts)) + [with_path]:
                    if directory.is_dir():
                        try:
                            directory.rmdir()
                        except OSError:
                            # Still in use or already gone: nothing of ours to clean there.
                            pass
