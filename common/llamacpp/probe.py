"""Start an rpc-server once on loopback, read its banner, stop it: proof that a build works."""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import socket
import time
from collections import deque
from pathlib import Path

from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.banner import RpcBanner
from llamafleet.common.process import describe_exit, line_buffered, spawn_group, stop_group

# CUDA initialisation of several GPUs can take seconds before the banner appears.
PROBE_TIMEOUT_S = 60.0


class ProbeError(LlamafleetError):
    """The rpc-server did not start and print its banner."""


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def probe_rpc_server(rpc_server: Path, timeout_s: float = PROBE_TIMEOUT_S) -> RpcBanner:
    """Run `rpc_server` on a free loopback port until its banner is complete, then stop it."""
    port = free_loopback_port()
    # No -c for a probe: nothing is loaded, and the operator's cache stays untouched.
    proc = spawn_group(line_buffered([str(rpc_server), "-H", "127.0.0.1", "-p", str(port)]))
    banner = RpcBanner()
    output: deque[str] = deque(maxlen=20)
    assert proc.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    pending = b""
    try:
        while not banner.complete and time.monotonic() < deadline:
            if not selector.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                # End of output: the process is exiting; give the kernel a moment to say how.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    # Still running with its output closed: treated below as no banner.
                    proc.wait(timeout=2)
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                output.append(line)
                banner.feed(line)
    finally:
        selector.close()
        exited_by_itself = proc.poll() is not None
        code = stop_group(proc)
        proc.stdout.close()
    if not banner.complete:
        # Its own exit is the cause; our SIGTERM after the timeout is not.
        why = describe_exit(code) if exited_by_itself else f"no complete banner within {timeout_s:.0f} s"
        raise ProbeError(
            f"{rpc_server.name} did not start: {why}", detail="\n".join(output) or "(no output)"
        )
    return banner
