"""Children started while a gRPC server runs in the parent start every time (grpc/grpc#43055).

gRPC's fork handlers, run between fork and exec when Python code runs there (a preexec_fn),
aborted about one child in a hundred with "epoll_wait error: Bad file descriptor" on this
machine; the agent spawns its rpc-server exactly so. Spawning must not run them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import pytest

from llamafleet.common.process import spawn_group_async, wait_gone

pytestmark = pytest.mark.integration
SPAWNS = 300


def test_every_child_starts_while_a_grpc_server_and_channel_are_live() -> None:
    async def scenario() -> list[tuple[int | None, bytes]]:
        server = grpc.aio.server()
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel("127.0.0.1:1")
        failed: list[tuple[int | None, bytes]] = []
        try:
            for _ in range(SPAWNS):
                proc = await spawn_group_async(["true"])
                assert proc.stdout is not None
                output = await proc.stdout.read()
                if await proc.wait() != 0 or output:
                    failed.append((proc.returncode, output[:200]))
        finally:
            await channel.close()
            await server.stop(None)
        return failed

    assert asyncio.run(scenario()) == []


def test_children_still_die_with_their_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import asyncio, sys\n"
         "from llamafleet.common.process import spawn_group_async\n"
         "async def main():\n"
         "    proc = await spawn_group_async(['sleep', '60'])\n"
         "    print(proc.pid, flush=True)\n"
         "    await asyncio.sleep(60)\n"
         "asyncio.run(main())\n"], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert wait_gone(child, 5), "the child outlived a SIGKILLed parent"
