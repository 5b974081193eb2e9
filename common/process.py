"""Child processes the way llamafleet runs them: own process group, never outliving us.

Every supervised binary (rpc-server, llama-server, build tools) starts through `spawn_group`:
- in a new process group, so a stop reaches its helpers too;
- with PR_SET_PDEATHSIG=SIGKILL, so a SIGKILLed parent leaves no orphan behind (set by
  `setpriv --pdeathsig`, exec'd in the child: no Python runs between fork and exec, so CPython
  can vfork and gRPC's fork handlers, which abort about one child in a hundred while a gRPC
  server runs in the parent — grpc/grpc#43055, seen here —, never run);
- line-buffered stdout (`stdbuf -oL`) where the program's banner is parsed live: llama.cpp
  prints with stdio, which is block-buffered into a pipe.
Stopping is `stop_group`: SIGTERM to the group, a grace period, then SIGKILL to the group.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

# How long a child gets between SIGTERM and SIGKILL. llama.cpp servers exit in well under a
# second on SIGTERM; five seconds covers a loaded machine without stalling a restart.
STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child between fork and exec (async-signal-safe work only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # If the parent already died before prctl, the signal would never come: exit now.
    if os.getppid() == 1:
        os._exit(1)


def _dying_with_parent(argv: Sequence[str]) -> tuple[list[str], Callable[[], None] | None]:
    """`argv` that gets SIGKILL when we die: behind setpriv, or (without it) via a preexec_fn."""
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv], None
    return list(argv), _die_with_parent


def line_buffered(argv: Sequence[str]) -> list[str]:
    """Prefix `stdbuf -oL -eL` when it exists, so stdio output arrives line by line."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", "-eL", *argv] if stdbuf else list(argv)


def spawn_group(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` in its own process group, stdin closed, stdout and stderr into one pipe."""
    command, preexec = _dying_with_parent(argv)
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        process_group=0,
        preexec_fn=preexec,
        close_fds=True,
    )


def signal_group(pid: int, sig: signal.Signals) -> bool:
    """Send `sig` to the process group led by `pid`; False if it is already gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # The group exists but belongs to someone else: it is alive.
        return True
    return True


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int:
    """SIGTERM the child's group, wait up to `grace_s`, then SIGKILL the group. Returns the code."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Helpers the child started in its group may outlive it; they go with it.
    if group_alive(proc.pid):
        signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def describe_exit(returncode: int) -> str:
    """'exited with code 1' or 'killed by signal SIGKILL (Killed)' for a Popen returncode."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    description = signal.strsignal(signum) or "unknown signal"
    return f"killed by signal {name} ({description})"


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Poll until no process `pid` exists (zombies count as gone); True if it went in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        # No /proc entry (or an unreadable one): the process is gone.
        return False
    return state not in (b"Z", b"X")


async def spawn_group_async(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> asyncio.subprocess.Process:
    """`spawn_group` for asyncio: own group, dies with us, stderr merged into a stdout pipe.

    Call it from the event loop's thread: PR_SET_PDEATHSIG fires when the *thread* that
    forked the child ends, and the loop's thread lives as long as the program.
    """
    command, preexec = _dying_with_parent(argv)
    return await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        process_group=0,
        preexec_fn=preexec,
        close_fds=True,
    )


async def stop_group_async(proc: asyncio.subprocess.Process, grace_s: float = STOP_GRACE_S) -> int:
    """`stop_group` for asyncio children: SIGTERM the group, grace, SIGKILL the group."""
    if proc.returncode is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=grace_s)
        except TimeoutError:
            signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    if group_alive(proc.pid):
        signal_group(proc.pid, signal.SIGKILL)
    assert proc.returncode is not None
    return proc.returncode
