"""A coordinator that runs on a worker (agent/coordinators.py), as the deployment sees a process.

The deployment owns its lifecycle exactly as for a local `llama-server` (`process.py`): spawn,
wait until healthy, watch, stop. What differs is how each is known:

- **spawned** by the agent's StartCoordinator; the request names the model by sha256, this
  node's share (its GPUs by UUID, first or last in layer order, or its CPU for the leading
  layers), the other shares' rpc-servers, and the controller's pre-computed tensor hashes;
- **healthy** when the agent reports it running and `/health` answers through the agent's proxy;
- **gone** when the agent reports it exited (with how, its last lines, and whether llama.cpp said
  an rpc-server under it died), when its node is unreachable or removed, or when the agent
  stops reporting it (restarted): whichever comes first;
- **reached** through `CoordinatorDoors`, the gateway session's middleware: it adds this
  coordinator's key (derived from the node credential, never sent to the agent) to requests for
  its URL and to nothing else, and when the coordinator is gone it cuts every request still open
  to it, so that a partitioned worker never holds a stream (the stream then resumes elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.tensor_hash_file import parse
from llamafleet.common.node_auth import coordinator_key
from llamafleet.common.supervised import Supervised
from llamafleet.controller.coordinator.command import CoordinatorSpec
from llamafleet.controller.coordinator.process import OUTPUT_LINES_KEPT, CoordinatorExited
from llamafleet.controller.inventory import Inventory
from llamafleet.proto.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)

WATCH_S = 0.1
# How long a started coordinator may stay missing from its agent's reports (the next report
# carries it; a heartbeat is 2 s by default).
FIRST_REPORT_S = 15.0
HEALTH_POLL_S = 0.2
STOP_CALL_S = 10.0


def _tensor_hashes(path: Path | None) -> list[pb.TensorHash]:
    """The controller's hash file as StartCoordinator carries it; none when there is none or it
    cannot be read (the worker's llama-server then hashes as a stock one does)."""
    if path is None:
        return []
    try:
        values = parse(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("not sending the tensor hashes in %s: %s", path, exc)
        return []
    return [pb.TensorHash(offset=offset, size=size, fnv1a=value) for (offset, size), value in values.items()]


@dataclass
class _Door:
    key: str
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    responses: weakref.WeakSet[aiohttp.ClientResponse] = field(default_factory=weakref.WeakSet)


class CoordinatorDoors:
    """The keys of the coordinators on workers, by URL, as one client middleware of the gateway's
    session; and which coordinators this controller runs at all (anything else a node reports is a
    stray: see CoordinatorManager.reap_strays)."""

    def __init__(self, tls_only: bool = False) -> None:
        self._doors: dict[str, _Door] = {}
        self._urls: dict[str, str] = {}  # coordinator id → its URL ("" while it is being started)
        # The agents use TLS (--agent-tls-ca): a key goes only to an https proxy, whose certificate
        # the session checks against that CA, never in the clear to an address a report named.
        self.tls_only = tls_only

    def expect(self, coordinator_id: str) -> None:
        """A start is under way: the node may report it before its StartCoordinator answers."""
        self._urls[coordinator_id] = ""

    def open(self, coordinator_id: str, url: str, key: str) -> None:
        self._urls[coordinator_id] = url
        self._doors[url] = _Door(key)

    def close(self, coordinator_id: str) -> None:
        """Forget it; requests still open to it are cut (their readers see a broken connection)."""
        door = self._doors.pop(self._urls.pop(coordinator_id, ""), None)
        if door is None:
            return
        door.gone.set()
        for response in list(door.responses):
            response.close()

    def known(self, coordinator_id: str) -> bool:
        return coordinator_id in self._urls

    def _door(self, url: str) -> _Door | None:
        base, sep, rest = url.partition("/c/")
        if not sep:
            return None
        return self._doors.get(f"{base}/c/{rest.split('/', 1)[0]}")

    async def middleware(self, request: aiohttp.ClientRequest,
                         handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        door = self._door(str(request.url))
        if door is None:
            return await handler(request)  # a local coordinator or a pool node: no key of ours goes there
        request.headers["Authorization"] = f"Bearer {door.key}"
        call = asyncio.ensure_future(handler(request))
        gone = asyncio.ensure_future(door.gone.wait())
        try:
            done, _ = await asyncio.wait({call, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if call not in done:
            call.cancel()
            raise aiohttp.ClientConnectionError("the coordinator is gone (its node is unreachable or it stopped)")
        response = call.result()
        door.responses.add(response)
        return response


class RemoteCoordinator:
    """One coordinator on a worker, with the interface of `CoordinatorProcess`."""

    log_path: Path | None = None  # its log is on the worker (agent state dir/coordinators)
    log_lines_lost = 0
    log_error = ""

    def __init__(self, inventory: Inventory, doors: CoordinatorDoors, node: str, coordinator_id: str,
                 status: pb.CoordinatorStatus, spec: CoordinatorSpec) -> None:
        self.inventory = inventory
        self.doors = doors
        self.node = node
        self.id = coordinator_id
        self.spec = spec
        self.url = status.url
        self.pid = status.pid
        self.started = time.monotonic()
        self.output: deque[str] = deque(status.last_output, maxlen=OUTPUT_LINES_KEPT)
        self.backend_lost = False
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._exit_message = ""
        self._running = False
        self._seen = False
        self._watcher = Supervised(f"coordinator {spec.model} on {node}", self._watch, on_failure=self._watch_failed)

    @classmethod
    async def start(cls, inventory: Inventory, doors: CoordinatorDoors, spec: CoordinatorSpec) -> RemoteCoordinator:
        assert spec.local is not None
        node = spec.local.node
        coordinator_id = secrets.token_hex(16)
        secret = inventory.node_secret(node)
        if not secret:
            raise CoordinatorExited(f"no credential for {node}: cannot key a coordinator there")
        request = pb.StartCoordinatorRequest(
            id=coordinator_id, model=spec.model, model_sha256=spec.local.model_sha256,
            local_gpus=list(spec.local.gpus), local_layers=list(spec.local.layers),
            rpc_endpoints=spec.endpoints, rpc_layers=list(spec.tensor_split), n_layers=spec.n_layers,
            ctx_per_slot=spec.ctx_per_slot, parallel=spec.parallel, chat_template=spec.builtin_chat_template or "",
            pooling=spec.embedding_pooling, prompt_cache_mib=spec.prompt_cache_mib, local_last=spec.local.last,
            tensor_hashes=await asyncio.to_thread(_tensor_hashes, spec.tensor_hashes))
        doors.expect(coordinator_id)
        try:
            status = await inventory.start_coordinator(node, request)
        except LlamafleetError as exc:
            doors.close(coordinator_id)
            raise CoordinatorExited(f"{node} could not start the coordinator for {spec.model}: {exc.message}") from None
        except BaseException:
            doors.close(coordinator_id)  # cancelled meanwhile: if it started, it is a stray now
            raise
        if doors.tls_only and not status.url.startswith("https://"):
            doors.close(coordinator_id)
            with contextlib.suppress(LlamafleetError):
                await inventory.stop_coordinator(node, coordinator_id, STOP_CALL_S)
            raise CoordinatorExited(f"{node}'s coordinator proxy is plain HTTP ({status.url[:80]}) while the agents "
                                    f"use TLS: its key is not sent there (give that agent --tls-cert/--tls-key)")
        doors.open(coordinator_id, status.url, coordinator_key(secret, coordinator_id))
        log.info("coordinator for %s: on %s (pid %d there) at %s over %s", spec.model, node, status.pid, status.url,
                 ",".join(spec.endpoints) or "no rpc-server")
        return cls(inventory, doors, node, coordinator_id, status, spec)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def _end(self, message: str) -> None:
        if self.exited.done():
            return
        self._exit_message = message
        self.exited.set_result(-1)
        self.doors.close(self.id)  # a stream stuck on a partitioned node ends now

    def _watch_failed(self, failure: object, exc: Exception) -> None:
        self._end(f"watching it failed: {exc!r}")

    def _gone(self) -> str | None:
        """Why it is gone, from the node's reports; None while it runs (or starts)."""
        record = self.inventory.record(self.node)
        if record is None:
            return f"node {self.node} was removed"
        if self.inventory.state(record) == "unreachable":
            return f"node {self.node} is unreachable{': ' + record.error if record.error else ''}"
        status = self.inventory.coordinator(self.node, self.id)
        if status is None:
            if self._seen or time.monotonic() - self.started > FIRST_REPORT_S:
                return f"the agent on {self.node} no longer runs it (restarted?)"
            return None
        self._seen = True
        self.pid = status.pid or self.pid
        self.output = deque(status.last_output, maxlen=OUTPUT_LINES_KEPT)
        self.backend_lost = status.backend_lost
        self._running = status.state == pb.COORDINATOR_STATE_RUNNING
        if status.state == pb.COORDINATOR_STATE_EXITED:
            return f"llama-server for {self.spec.model} on {self.node} {status.last_exit or 'exited'}"
        return None

    async def _watch(self) -> None:
        while not self.exited.done():
            if (why := self._gone()) is not None:
                self._end(why)
                return
            await asyncio.sleep(WATCH_S)

    def exit_error(self) -> CoordinatorExited:
        message = self._exit_message or f"llama-server for {self.spec.model} on {self.node} did not become healthy"
        return CoordinatorExited(message, detail="\n".join(self.output))

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        """Return once the agent reports it running and /health answers 200 through the proxy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exited.done():
                raise self.exit_error()
            if self._running:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.url}/health", timeout=aiohttp.ClientTimeout(total=5)) as reply:
                        if reply.status == 200:
                            return
            await asyncio.wait({self.exited}, timeout=HEALTH_POLL_S)
        await self.stop()
        raise CoordinatorExited(f"llama-server for {self.spec.model} on {self.node} was not healthy within "
                                f"{timeout_s:.0f}s", detail="\n".join(self.output))

    async def _free_backends(self) -> None:
        """Restart the rpc-servers this coordinator used, so that one nobody can reach holds none."""
        for backend in self.spec.backends:
            status = self.inventory.rpc_server(backend.node, backend.endpoint)
            record = self.inventory.record(backend.node)
            if (status is None or status.generation != backend.generation or record is None
                    or self.inventory.state(record) == "unreachable"):
                continue  # restarted already, or not ours to free
            log.info("restarting rpc-server %s on %s: the coordinator for %s on %s cannot be reached to stop it",
                     backend.endpoint, backend.node, self.spec.model, self.node)
            try:
                restarted = await self.inventory.restart_rpc_server(backend.node, status.index)
            except LlamafleetError as exc:
                log.warning("could not restart rpc-server %s on %s: %s", backend.endpoint, backend.node, exc.message)
                continue
            # The next placement must see the new generation, or it would take this one for a restart later.
            deadline = time.monotonic() + FIRST_REPORT_S
            while time.monotonic() < deadline:
                now = self.inventory.rpc_server(backend.node, backend.endpoint)
                if now is not None and now.generation >= restarted.generation:
                    break
                await asyncio.sleep(0.05)

    async def drain(self) -> None:
        """Its last lines come with the agent's report that it exited: nothing to wait for."""

    async def stop(self, grace_s: float = 0.0) -> int:
        """Ask the agent to stop it (the agent's own grace applies); a node that cannot be reached
        is told later: the manager stops coordinators it no longer knows of when they show up."""
        self._end(self._exit_message or "stopped")
        self._watcher.cancel()
        record = self.inventory.record(self.node)
        if record is None or self.inventory.state(record) == "unreachable":
            # It may still run, and hold the other shares' rpc-servers (one client each): free them
            # for the next placement. The manager stops it once the node is back (reap_strays).
            await self._free_backends()
            return 0
        try:
            await self.inventory.stop_coordinator(self.node, self.id, STOP_CALL_S)
        except LlamafleetError as exc:
            log.warning("could not stop the coordinator for %s on %s: %s", self.spec.model, self.node, exc.message)
        return 0
