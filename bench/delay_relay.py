"""A TCP relay that delays every byte by a fixed one-way time, both ways: a LAN's latency on loopback.

These machines have no sch_netem (tc's delay), so the benchmarks put this in front of an
rpc-server instead: each chunk read from one side is written to the other `delay_s` after it
arrived, in order, without holding up the reads (so bandwidth is not capped, only latency
added). A round trip through the relay costs 2 × delay_s more than without it.

    python bench/delay_relay.py --listen 127.0.0.9:50100 --to 127.0.0.2:50052 --delay-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass

CHUNK = 1 << 20


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    sender = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((time.monotonic() + delay_s, data))
    except OSError:
        pass
    finally:
        queue.put_nowait((0.0, b""))
        with contextlib.suppress(OSError):
            await sender


@dataclass
class Relay:
    listen: tuple[str, int]
    target: tuple[str, int]
    delay_s: float
    server: asyncio.Server | None = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(_pump(reader, up_writer, self.delay_s), _pump(up_reader, writer, self.delay_s))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, *self.listen)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


class RelayThread:
    """Relays on their own event loop in a thread, for benchmarks that are not async."""

    def __init__(self, pairs: list[tuple[tuple[str, int], tuple[str, int]]], delay_s: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._relays = [Relay(listen, target, delay_s) for listen, target in pairs]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="delay relays")
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    async def _start(self) -> None:
        for relay in self._relays:
            await relay.start()

    def close(self) -> None:
        async def stop() -> None:
            for relay in self._relays:
                await relay.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> RelayThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _main(args: argparse.Namespace) -> None:
    relay = Relay(_address(args.listen), _address(args.to), args.delay_ms / 1000)
    await relay.start()
    print(f"relaying {args.listen} → {args.to} with {args.delay_ms} ms each way", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    asyncio.run(_main(parser.parse_args()))
