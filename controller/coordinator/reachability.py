"""Is an unreachable node's rpc-server still there? A TCP connect decides, off the coordinator's path.

A node turns unreachable when its agent's heartbeats stop. That alone says little about its
rpc-server: a frozen or restarting agent leaves it serving, and stopping the coordinator then
would cut answers for nothing. A cut link is another matter: no RST, no FIN, and llama-server
waits on its RPC socket for ever (llama.cpp's RPC client has no timeouts), holding the request
with it. So while a backend's node is unreachable, the controller tries to connect to the
rpc-server's port: a connection that is not accepted within PROBE_TIMEOUT_S means the coordinator
over it is stopped (and its answers resume elsewhere); one that is accepted leaves it alone and is
tried again after PROBE_AGAIN_S. The probe closes its connection at once; the rpc-server, which
serves one client at a time, sees it later as a client that hung up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from llamafleet.common.settings import split_host_port

PROBE_TIMEOUT_S = 2.0
PROBE_AGAIN_S = 5.0


async def accepts(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts a TCP connection at `endpoint` (HOST:PORT) within `timeout_s`."""
    host, port = split_host_port(endpoint)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@dataclass
class _Probe:
    task: asyncio.Task[bool]
    started: float


class RpcReachability:
    """Connect probes of rpc-servers on unreachable nodes, one at a time per endpoint."""

    def __init__(self, timeout_s: float = PROBE_TIMEOUT_S, again_s: float = PROBE_AGAIN_S) -> None:
        self._timeout_s = timeout_s
        self._again_s = again_s
        self._probes: dict[str, _Probe] = {}

    def gone(self, endpoint: str) -> bool:
        """True once a probe found nothing at `endpoint`; starts one if none is running or recent.
        Called from the coordinators' watch loop, so it never waits."""
        probe = self._probes.get(endpoint)
        if probe is not None and probe.task.done():
            if not probe.task.cancelled() and probe.task.exception() is None and probe.task.result() is False:
                return True
            if time.monotonic() - probe.started < self._again_s:
                return False
            probe = None
        if probe is None:
            task = asyncio.get_running_loop().create_task(accepts(endpoint, self._timeout_s),
                                                          name=f"rpc probe {endpoint}")
            self._probes[endpoint] = _Probe(task, time.monotonic())
        return False

    def forget(self, endpoint: str) -> None:
        """The node is back (or the endpoint no longer used): the next trouble starts afresh."""
        probe = self._probes.pop(endpoint, None)
        if probe is not None and not probe.task.done():
            probe.task.cancel()

    def close(self) -> None:
        for endpoint in list(self._probes):
            self.forget(endpoint)
