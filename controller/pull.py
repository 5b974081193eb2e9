"""`llamafleet pull`: copy a model file from the controller into agents' models dirs.

The bytes travel over the gRPC channel the controller already uses for each agent, with that
node's own proof (common/node_auth.py): nothing new to open, configure or trust. Per node:

1. `PrepareModelPush{name, sha256, size}`: does the node hold the file already (that sha256 and
   size, under any name)? Then nothing is sent. Otherwise the answer is how many bytes of this
   very file an interrupted pull left there, and the push resumes at that byte.
2. `PushModel`: a header, and once the agent answers `accepted`, the file from that offset in
   1 MiB messages (gRPC refuses messages over 4 MiB by default), read in a thread, at most
   `--pull-rate-limit` bytes a second per node when set. The agent verifies the sha256 and lists the file READY (agent/pull.py); its next
   WatchStatus report makes the node a holder (controller/holders.py).
3. In the background, the node stages every tensor above llama.cpp's 10 MiB hash threshold into
   its rpc cache (`StageTensors`), so a later placement or failover onto it sends no weight
   bytes. A failure there is a `stage.failed` event, never a failed pull.

The model's sha256 is the controller's own (computed once per file version, in a thread). A pull
lives as long as the request that asked for it: a client that goes away cancels it, and the
nodes keep what arrived for the next pull to resume. Nodes are pulled in parallel, one pull of
a model into a node at a time.

Events: `pull` (a node's transfer begins), `pull.done` (pulled, or held already: bytes sent,
where it resumed), `pull.failed` (the cause); then `stage` or `stage.failed` for the staging.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamafleet.common.model_names import check_name
from llamafleet.common.wire_limits import MAX_RANGES
from llamafleet.common.changes import ChangeFeed
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.units import format_size
from llamafleet.controller.coordinator.manager import STAGE_TIMEOUT_S
from llamafleet.controller.events import EventSink, no_events
from llamafleet.controller.gguf import GGUFHeader, read_gguf_header
from llamafleet.controller.holders import ModelDigests
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.models import ModelStore, parse_model_name
from llamafleet.controller.prestage import every_large_tensor
from llamafleet.controller.tensor_hashes import TensorHashes
from llamafleet.proto.v1 import agent_pb2 as pb

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
READ_BYTES = 8 * CHUNK_BYTES  # one read in a thread feeds eight messages
PREPARE_TIMEOUT_S = 60.0
PROGRESS_INTERVAL_S = 0.5
FINISHED_KEPT = 20  # finished pulls `/pulls` still lists (the dashboard shows how the last ones ended)
ENDED = ("done", "held", "failed")


class PullRefused(LlamafleetError):
    """Nothing can be pulled as asked: no node that could keep it, a node without a models dir… (HTTP 409)."""


def agent_name(model: str) -> str:
    """The name a model gets in an agent's models dir: `gemma` → gemma, `gemma3:270m` → gemma3/270m,
    `me/tuned` → me/tuned, `me/tuned:q8` → me/tuned-q8 (NAME or FOLDER/NAME, as agents index files)."""
    name = parse_model_name(model)
    if name.namespace == "library":
        return name.model if name.tag == "latest" else f"{name.model}/{name.tag}"
    return f"{name.namespace}/{name.model}" + ("" if name.tag == "latest" else f"-{name.tag}")


@dataclass
class NodePull:
    """One node's part of a pull."""

    node: str
    name: str  # in the node's models dir
    total: int
    state: str = "waiting"  # waiting, preparing, sending, done, held, failed
    completed: int = 0  # bytes of the file the node has
    resumed_from: int = 0
    sent: int = 0
    error: str = ""
    seconds: float = 0.0

    def to_json(self, model: str) -> dict[str, Any]:
        status = {"sending": "pulling"}.get(self.state, self.state)
        doc: dict[str, Any] = {"status": status, "model": model, "node": self.node, "name": self.name,
                               "completed": self.completed, "total": self.total, "resumed_from": self.resumed_from,
                               "sent_bytes": self.sent, "seconds": round(self.seconds, 3)}
        if self.error:
            doc["error"] = self.error
        return doc


@dataclass
class Pull:
    id: int
    model: str  # canonical (gemma:latest)
    path: Path
    size: int
    name: str
    explicit: bool  # the nodes were named; otherwise they are chosen once the sha256 is known
    nodes: dict[str, NodePull] = field(default_factory=dict)
    sha256: str = ""
    state: str = "hashing"  # hashing, pulling, done, failed
    note: str = ""  # why nothing needed pulling, when nothing did
    error: str = ""
    started_unix_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    changes: ChangeFeed = field(default_factory=ChangeFeed)
    task: asyncio.Task[None] | None = None
    cancel_reason: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done():
            self.cancel_reason = reason
            self.task.cancel()

    def outcome(self) -> dict[str, Any]:
        """The last line of the progress stream, and what `"stream": false` answers."""
        nodes = [p.to_json(self.model) for p in self.nodes.values()]
        doc: dict[str, Any] = {"status": "success" if self.state == "done" else "failed", "model": self.model,
                               "sha256": self.sha256, "total": self.size, "name": self.name, "nodes": nodes}
        if self.note:
            doc["message"] = self.note
        if self.state == "failed":
            doc["error"] = self.error or "the pull failed"
        return doc

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "state": self.state, "sha256": self.sha256, "total": self.size,
                "name": self.name, "started_unix_ms": self.started_unix_ms, "note": self.note, "error": self.error,
                "nodes": [p.to_json(self.model) for p in self.nodes.values()]}

    async def progress(self, interval_s: float = PROGRESS_INTERVAL_S) -> AsyncIterator[dict[str, Any]]:
        """NDJSON lines, as Ollama's /api/pull streams them: each change of a node (at most one
        line per node per `interval_s` while it sends), then the outcome."""
        shown: dict[str, tuple[str, int]] = {}
        hashing_shown = False
        while True:
            version = self.changes.version
            if self.state == "hashing" and not hashing_shown:
                hashing_shown = True
                yield {"status": "hashing", "model": self.model, "total": self.size}
            for part in list(self.nodes.values()):
                if part.state != "waiting" and shown.get(part.node) != (part.state, part.completed):
                    shown[part.node] = (part.state, part.completed)
                    yield part.to_json(self.model)
            if self.finished:
                yield self.outcome()
                return
            await self.changes.wait_newer(version, interval_s)


class PullManager:
    def __init__(self, models: ModelStore, inventory: Inventory, digests: ModelDigests,
                 events: EventSink = no_events, rate_limit: int = 0, tensor_hashes: TensorHashes | None = None) -> None:
        """`rate_limit`: most bytes a second sent to each node (0: as fast as the link goes);
        `tensor_hashes`: the controller's FNV-1a of the model's tensors, so a node names the entries
        it stages after a pull without reading its new copy again."""
        self._tensor_hashes = tensor_hashes
        self._models = models
        self._inventory = inventory
        self._digests = digests
        self._events = events
        self._rate_limit = rate_limit
        self._running: dict[int, Pull] = {}
        self._finished: collections.deque[Pull] = collections.deque(maxlen=FINISHED_KEPT)
        self._stagings: set[asyncio.Task[None]] = set()
        self._next_id = 1

    # ---- starting ------------------------------------------------------------------------------

    def start(self, model: str, nodes: Sequence[str] = (), name: str = "") -> Pull:
        """Begin pulling `model` into `nodes` (default: every reachable node with a models dir that
        does not hold it). Bad requests raise here, before anything is sent."""
        resolved = self._models.resolve(model)
        key = parse_model_name(model).short
        name = name or agent_name(model)
        check_name(name)
        try:
            size = resolved.path.stat().st_size
        except OSError as exc:
            raise LlamafleetError(f"cannot read {resolved.path}: {exc.strerror or exc}") from None
        explicit = list(dict.fromkeys(nodes))
        for address in explicit:
            self._check_target(address, key)
        if not explicit and not self._candidates():
            raise PullRefused(f"no reachable node has a models dir (--models-dir): none can keep {key}")
        pull = Pull(self._next_id, key, resolved.path, size, name, bool(explicit),
                    {address: NodePull(address, name, size) for address in explicit},
                    state="hashing" if self._digests.known(resolved.path) is None else "pulling")
        self._next_id += 1
        self._running[pull.id] = pull
        pull.task = asyncio.create_task(self._run(pull), name=f"pull {key}")
        pull.task.add_done_callback(functools.partial(self._ended, pull))
        return pull

    def _candidates(self) -> list[str]:
        return [r.address for r in self._inventory.records()
                if self._inventory.state(r) != "unreachable" and r.status is not None and r.status.models_dir]

    def _check_target(self, address: str, model: str) -> None:
        record = self._inventory.record(address)
        if record is None:
            raise UsageError(f"no node {address} in the fleet (see `llamafleet nodes`)")
        if self._inventory.state(record) == "unreachable" or record.status is None:
            raise PullRefused(f"node {address} is unreachable" + (f": {record.error}" if record.error else ""))
        if not record.status.models_dir:
            raise PullRefused(f"node {address} has no models dir: its agent keeps model files only with "
                              "--models-dir DIR")
        if self._busy(model, address):
            raise PullRefused(f"a pull of {model} into {address} is under way already")

    def _busy(self, model: str, address: str) -> bool:
        return any(p.model == model and address in p.nodes and p.nodes[address].state not in ENDED
                   for p in self._running.values())

    def _default_targets(self, pull: Pull) -> None:
        """Every reachable node with a models dir that does not hold the file (nor is being sent it)."""
        held, busy = [], []
        for address in self._candidates():
            record = self._inventory.record(address)
            assert record is not None and record.status is not None  # a candidate has both
            if any(m.state == pb.MODEL_FILE_STATE_READY and m.sha256 == pull.sha256 and m.size_bytes == pull.size
                   for m in record.status.models):
                held.append(address)
            elif self._busy(pull.model, address):
                busy.append(address)
            else:
                pull.nodes[address] = NodePull(address, pull.name, pull.size)
        if not pull.nodes:
            parts = [f"{len(held)} node(s) with a models dir hold {pull.model} already"] if held else []
            parts += [f"{len(busy)} more being sent it by another pull"] if busy else []
            pull.note = "nothing to do: " + "; ".join(parts or ["no reachable node has a models dir"])

    # ---- running -------------------------------------------------------------------------------

    async def _run(self, pull: Pull) -> None:
        try:
            pull.changes.bump()
            pull.sha256 = self._digests.known(pull.path) or await self._digests.sha256_of(pull.path)
            if not pull.explicit:
                self._default_targets(pull)
            pull.state = "pulling"
            pull.changes.bump()
            await asyncio.gather(*(self._push(pull, part) for part in pull.nodes.values()))
            failed = [p for p in pull.nodes.values() if p.state == "failed"]
            if failed:
                pull.error = f"{len(failed)} of {len(pull.nodes)} node(s) failed: " + "; ".join(
                    f"{p.node}: {p.error}" for p in failed)
            pull.state = "failed" if failed else "done"
        except LlamafleetError as exc:
            pull.state, pull.error = "failed", exc.message
            self._events("pull.failed", pull.model, f"pulling {pull.model} failed: {exc.message}", model=pull.model)
        except asyncio.CancelledError:
            pull.state, pull.error = "failed", f"cancelled: {pull.cancel_reason or 'the controller is stopping'}"
            raise
        finally:
            pull.changes.bump()

    async def _push(self, pull: Pull, part: NodePull) -> None:
        started = time.monotonic()
        part.state = "preparing"
        pull.changes.bump()
        try:
            prepared = await self._inventory.prepare_push(part.node, part.name, pull.sha256, pull.size,
                                                          PREPARE_TIMEOUT_S)
            if prepared.already_held:
                self._held(pull, part, prepared.model.name)
                return
            offset = part.resumed_from = part.completed = prepared.have_bytes
            part.state = "sending"
            pull.changes.bump()
            resuming = f", resuming at {format_size(offset)}" if offset else ""
            self._events("pull", part.node, f"pulling {pull.model} as {part.name}: {format_size(pull.size - offset)} "
                         f"to send{resuming}", model=pull.model, name=part.name, sha256=pull.sha256, total=pull.size,
                         resumed_from=offset)

            def sent(count: int) -> None:
                part.sent += count
                part.completed += count

            header = pb.PushModelHeader(name=part.name, sha256=pull.sha256, size_bytes=pull.size, offset=offset)
            reply = await self._inventory.push_model(part.node, header, functools.partial(self._read, pull.path,
                                                                                         size=pull.size), sent)
            if reply.already_held:  # it arrived by another way meanwhile (a models dir shared with another node)
                self._held(pull, part, reply.model.name)
                return
            part.state, part.name, part.completed = "done", reply.model.name or part.name, pull.size
            part.seconds = time.monotonic() - started
            self._events("pull.done", part.node, f"pulled {pull.model} as {part.name}: {format_size(part.sent)} "
                         f"sent{resuming} in {part.seconds:.1f}s, sha256 verified", model=pull.model, name=part.name,
                         path=reply.model.path, held=False, sent_bytes=part.sent, resumed_from=offset,
                         seconds=round(part.seconds, 3))
            self._stage_later(pull.model, part.node, pull.path, pull.sha256)
        except LlamafleetError as exc:
            self._fail(pull, part, exc.message)
        except OSError as exc:
            self._fail(pull, part, f"cannot read {pull.path}: {exc.strerror or exc}")
        except asyncio.CancelledError:
            self._fail(pull, part, f"cancelled ({pull.cancel_reason or 'the controller is stopping'}): "
                                   f"{part.node} keeps the {format_size(part.completed)} that arrived for a resume")
            raise
        finally:
            part.seconds = time.monotonic() - started
            pull.changes.bump()

    def _held(self, pull: Pull, part: NodePull, name: str) -> None:
        part.state, part.completed, part.name = "held", pull.size, name or part.name
        self._events("pull.done", part.node, f"holds {pull.model} already (as {part.name}): nothing sent",
                     model=pull.model, name=part.name, held=True, sent_bytes=0)

    def _fail(self, pull: Pull, part: NodePull, message: str) -> None:
        part.state, part.error = "failed", message
        log.warning("pulling %s into %s failed: %s", pull.model, part.node, message)
        self._events("pull.failed", part.node, f"pulling {pull.model} failed: {message}",
                     model=pull.model, name=part.name, sent_bytes=part.sent, completed=part.completed)

    async def _read(self, path: Path, offset: int, size: int) -> AsyncGenerator[bytes]:
        """The file from `offset` in CHUNK_BYTES pieces, read in a thread, paced by the rate limit."""
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY)
        try:
            position, started = offset, time.monotonic()
            while position < size:
                block = await asyncio.to_thread(os.pread, fd, min(READ_BYTES, size - position), position)
                if not block:
                    raise OSError(errno.EIO, f"it ended at byte {position} of {size} (changed during the pull?)")
                for start in range(0, len(block), CHUNK_BYTES):
                    chunk = block[start:start + CHUNK_BYTES]
                    yield chunk
                    position += len(chunk)
                    if self._rate_limit:
                        ahead_s = (position - offset) / self._rate_limit - (time.monotonic() - started)
                        if ahead_s > 0:
                            await asyncio.sleep(ahead_s)
        finally:
            os.close(fd)

    def _ended(self, pull: Pull, task: asyncio.Task[None]) -> None:
        self._running.pop(pull.id, None)
        self._finished.append(pull)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # _run handles every failure it knows; anything else is a bug, and it is said so.
            log.error("pulling %s failed unexpectedly: %r", pull.model, exc, exc_info=exc)
            pull.state, pull.error = "failed", f"failed unexpectedly: {exc!r}"
            self._events("pull.failed", pull.model, f"pulling {pull.model} failed unexpectedly: {exc!r}",
                         model=pull.model)
            pull.changes.bump()

    # ---- staging after a pull ------------------------------------------------------------------

    def _stage_later(self, model: str, node: str, path: Path, sha256: str) -> None:
        task = asyncio.create_task(self._stage(model, node, path, sha256), name=f"stage {model} on {node}")
        self._stagings.add(task)
        task.add_done_callback(functools.partial(self._staging_ended, model, node))

    async def _stage(self, model: str, node: str, path: Path, sha256: str) -> None:
        """Have `node` write the rpc cache entries of every large tensor of the file it now holds."""
        try:
            header = await asyncio.to_thread(read_gguf_header, path)
            ranges = every_large_tensor(header)
            if not ranges:
                log.info("%s has no tensor above the hash threshold: nothing to stage on %s", model, node)
                return
            known = await self._known_hashes(model, path, header)
            # For no coordinator (no rpc-server slot): the cache keeper may evict them like any
            # model's that no running rpc-server uses, least recently used first.
            replies = [await self._inventory.stage_tensors(node, sha256, ranges[i:i + MAX_RANGES], STAGE_TIMEOUT_S,
                                                           known=known) for i in range(0, len(ranges), MAX_RANGES)]
        except LlamafleetError as exc:
            self._stage_failed(model, node, exc.message)
            return
        except OSError as exc:
            self._stage_failed(model, node, f"cannot read {path}: {exc.strerror or exc}")
            return
        doc = {key: sum(getattr(r, key) for r in replies)
               for key in ("staged", "present", "rewritten", "referenced", "bytes_written", "cached_bytes")}
        seconds = round(sum(r.seconds for r in replies), 3)
        references = f" ({doc['referenced']} as references to its copy)" if doc["referenced"] else ""
        self._events("stage", node, f"staged {model} after its pull: {doc['staged']} entries written{references}, "
                     f"{doc['present']} present, {format_size(doc['cached_bytes'])} in the rpc cache in "
                     f"{seconds:.2f}s: loading it onto {node} sends none of those bytes", model=model, after_pull=True,
                     seconds=seconds, **doc)

    async def _known_hashes(self, model: str, path: Path, header: GGUFHeader) -> dict[tuple[int, int], int]:
        """The tensors' FNV-1a if the controller has or can make them (it only saves the node a read)."""
        if self._tensor_hashes is None:
            return {}
        try:
            hashes = await self._tensor_hashes.ensure(path, header)
        except Exception as exc:  # noqa: BLE001 - the hashes only save time; staging goes on without them
            log.error("pre-computing tensor hashes of %s failed unexpectedly: %r", model, exc, exc_info=exc)
            return {}
        return hashes.values if hashes is not None else {}

    def _stage_failed(self, model: str, node: str, message: str) -> None:
        log.warning("staging %s on %s after its pull failed: %s", model, node, message)
        self._events("stage.failed", node, f"staging {model} after its pull failed: {message}", model=model,
                     after_pull=True)

    def _staging_ended(self, model: str, node: str, task: asyncio.Task[None]) -> None:
        self._stagings.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("staging %s on %s failed unexpectedly: %r", model, node, exc, exc_info=exc)
            self._stage_failed(model, node, f"unexpected error {exc!r}")

    # ---- views and shutdown --------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """`GET /llamafleet/v1/pulls`: those running, then the last ones that ended, newest first."""
        running = sorted(self._running.values(), key=lambda p: p.id)
        return [p.to_json() for p in running] + [p.to_json() for p in reversed(self._finished)]

    def into(self, address: str) -> list[dict[str, Any]]:
        """The pulls under way into one node (for `nodes`)."""
        return [p.nodes[address].to_json(p.model) for p in self._running.values()
                if address in p.nodes and p.nodes[address].state not in ENDED]

    def of(self, model: str) -> list[dict[str, Any]]:
        """The nodes a model is being pulled into now (for `models`)."""
        return [part.to_json(p.model) for p in self._running.values() if p.model == model
                for part in p.nodes.values() if part.state not in ENDED]

    async def close(self) -> None:
        pulls = list(self._running.values())
        for pull in pulls:
            pull.cancel("the controller is stopping")
        tasks = [p.task for p in pulls if p.task is not None] + list(self._stagings)
        for task in self._stagings:
            task.cancel()
        # Cancelling is how a pull or a staging is told to end; what else they raised, _ended logged.
        await asyncio.gather(*tasks, return_exceptions=True)
