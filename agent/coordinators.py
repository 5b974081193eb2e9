"""Coordinators this agent runs for the controller (StartCoordinator), and the door to them.

A model's coordinator (`llama-server`) on the worker that holds the model's largest share
computes that share on the worker's own devices, so every token crosses the network once less
(issue "The coordinator runs where the weights are"). The controller decides where and when;
this module only checks what it is asked, runs it, and reports:

- **llama-server stays on loopback**, with `--api-key-file`; the gateway reaches it through one
  proxy on `--rpc-host` (the address the operator already gave for llama.cpp's traffic), which
  forwards only the routes the gateway uses, and only with the coordinator's key.
- **The key is never sent**: it is HMAC-SHA256 of the node credential over the coordinator's id
  (`common/node_auth.py` `coordinator_key`), derived here from every secret the agent holds when
  the coordinator starts, and by the controller from the one it holds. Unknown id and wrong key
  get the same 401, so the proxy says nothing about which coordinators exist.
- **Nothing from the request reaches a shell or a path**: the model is a file of the models dir
  named by sha256, GPUs are NVML UUIDs of this host, endpoints are HOST:PORT, the template and
  the pooling are short words; the argv is built by `common/llamacpp/server_command.py`.
- **No policy**: a coordinator that exits stays reported as `exited`, with how and its last
  lines, until the controller stops it (the controller restarts or re-places; one owner).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import aiohttp
from aiohttp import web

from llamafleet.agent.models import ModelFile
from llamafleet.agent.staging import find_model
from llamafleet.common.digests import FileKey
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.common.llamacpp.server_command import RPC_BACKEND_LOST, ServerCommand, server_env
from llamafleet.common.llamacpp.tensor_hash_file import render
from llamafleet.common.node_auth import coordinator_key
from llamafleet.common.process import STOP_GRACE_S, describe_exit, spawn_group_async, stop_group_async
from llamafleet.common.supervised import Supervised

log = logging.getLogger(__name__)
OUTPUT_LINES_KEPT = 30
LOGS_KEPT = 20
HEALTH_POLL_S = 0.1
# The longest a model may load before the start counts as failed (a 70B share from a slow disk).
START_TIMEOUT_S = 900.0
# The routes of llama-server the gateway uses; nothing else (no /slots save/restore, no /props
# changes, no web UI) is reachable through the proxy.
PROXIED_PATHS = frozenset({"/health", "/v1/chat/completions", "/completion", "/tokenize", "/detokenize",
                           "/apply-template", "/v1/embeddings", "/props"})
# Requests are prompts: a long context with tools is a few MiB, never more than this.
MAX_REQUEST_BYTES = 64 * 1024 * 1024
_ID = re.compile(r"^[0-9a-f]{32}$")
_WORD = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# A model name as Ollama spells it (gemma3:270m, library/qwen3:4b); never one that reads as a flag.
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_POOLINGS = {"", "none", "mean", "cls", "last", "rank"}
_ENDPOINT = re.compile(r"^[A-Za-z0-9.-]{1,253}:[0-9]{1,5}$")
MAX_PARALLEL = 64
MAX_CTX = 1 << 24
MAX_LAYERS = 4096
MAX_TENSOR_HASHES = 1 << 16  # a 405B GGUF has about 1100 weight tensors


class CoordinatorRefused(LlamafleetError):
    """The agent cannot run this coordinator (no such model file, no build, too many running)."""


class TooManyCoordinators(CoordinatorRefused):
    """--max-coordinators are running already."""


class UnknownCoordinator(LlamafleetError):
    """No coordinator with that id runs here."""


@dataclass(frozen=True)
class CoordinatorRequest:
    """StartCoordinator, as plain values (agent/service.py converts)."""

    id: str
    model: str
    model_sha256: str
    local_gpus: tuple[str, ...]
    local_layers: tuple[int, ...]
    rpc_endpoints: tuple[str, ...]
    rpc_layers: tuple[int, ...]
    n_layers: int
    ctx_per_slot: int
    parallel: int
    chat_template: str = ""
    pooling: str = ""
    prompt_cache_mib: int = 0
    local_last: bool = False  # the local GPUs after the rpc-servers (with the output layer)
    # (file offset, size, FNV-1a) of weight tensors, the controller's (tensor_hash_file.py)
    tensor_hashes: tuple[tuple[int, int, int], ...] = ()


def proxy_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> ssl.SSLContext | None:
    """The proxy's server context from the agent's --tls-cert/--tls-key (--tls-client-ca: mTLS);
    None without TLS. A file that cannot be read is the operator's UsageError, as for gRPC."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot use {cert} / {key} for the coordinator proxy: {exc}") from None
    return context


def check_request(request: CoordinatorRequest, gpu_uuids: Sequence[str]) -> None:
    """Refuse (UsageError, one line naming the field) anything the argv must not carry."""
    if not _ID.match(request.id):
        raise UsageError("id must be 32 lowercase hex digits")
    if not _MODEL.match(request.model):
        raise UsageError("model must be a model name of letters, digits and ._-/:")
    if not re.fullmatch(r"[0-9a-f]{64}", request.model_sha256):
        raise UsageError("model_sha256 must be 64 lowercase hex digits")
    for endpoint in request.rpc_endpoints:
        if not _ENDPOINT.match(endpoint) or not 0 < int(endpoint.rpartition(":")[2]) < 65536:
            raise UsageError(f"rpc endpoint '{endpoint[:80]}' is not HOST:PORT")
    if len(request.rpc_layers) != len(request.rpc_endpoints):
        raise UsageError("rpc_layers needs one count per rpc endpoint")
    unknown = [uuid for uuid in request.local_gpus if uuid not in gpu_uuids]
    if unknown:
        raise UsageError(f"this node has no GPU {unknown[0][:64]}")
    if len(set(request.local_gpus)) != len(request.local_gpus):
        raise UsageError("local_gpus names a GPU twice")
    if len(request.local_layers) != max(len(request.local_gpus), 1):
        raise UsageError("local_layers needs one count per local GPU (one for the CPU)")
    if not 1 <= request.n_layers <= MAX_LAYERS:
        raise UsageError(f"n_layers must be 1..{MAX_LAYERS}")
    if sum(request.local_layers) + sum(request.rpc_layers) != request.n_layers + 1:
        raise UsageError("the layer counts must add up to n_layers + 1 (the output layer counted last)")
    if request.local_last and not request.local_gpus:
        raise UsageError("local_last needs local_gpus: llama.cpp keeps only the leading layers on the CPU")
    if request.local_last and request.local_layers[-1] < 1:
        raise UsageError("with local_last the last local GPU must hold the output layer")
    if not request.local_last and request.rpc_endpoints and request.rpc_layers[-1] < 1:
        raise UsageError("the last rpc endpoint must hold the output layer")
    if not 1 <= request.parallel <= MAX_PARALLEL or not 1 <= request.ctx_per_slot * request.parallel <= MAX_CTX:
        raise UsageError(f"parallel must be 1..{MAX_PARALLEL} and ctx_per_slot × parallel 1..{MAX_CTX}")
    if request.chat_template and not _WORD.match(request.chat_template):
        raise UsageError("chat_template must be the name of a llama.cpp built-in template")
    if request.pooling not in _POOLINGS:
        raise UsageError(f"pooling must be one of {', '.join(sorted(p for p in _POOLINGS if p))}")
    if request.prompt_cache_mib < -1:
        raise UsageError("prompt_cache_mib must be -1 (no limit), 0 (off) or a size in MiB")
    if len(request.tensor_hashes) > MAX_TENSOR_HASHES:
        raise UsageError(f"tensor_hashes: more than {MAX_TENSOR_HASHES} tensors")
    if any(size == 0 for _, size, _ in request.tensor_hashes):  # offsets and hashes: uint64/fixed64 on the wire
        raise UsageError("tensor_hashes: every tensor needs a size above 0")


def server_command(request: CoordinatorRequest, model_path: Path, port: int, key_file: Path) -> ServerCommand:
    """The plan as llama.cpp flags: this node's GPUs (CUDA0… once CUDA_VISIBLE_DEVICES names them
    in layer order) before the rpc-servers' devices, or after them with `local_last`; or this
    node's CPU for the leading layers, then one RPC device per endpoint."""
    gpus = tuple(f"CUDA{i}" for i in range(len(request.local_gpus)))
    rpc = tuple(f"RPC{i}" for i in range(len(request.rpc_endpoints)))
    local = request.local_layers if gpus else ()
    devices, split = (rpc + gpus, request.rpc_layers + local) if request.local_last else (gpus + rpc, local + request.rpc_layers)
    return ServerCommand(
        model_path=model_path, alias=request.model, rpc_endpoints=request.rpc_endpoints, devices=devices,
        tensor_split=split, n_layers=request.n_layers, cpu_layers=0 if gpus else request.local_layers[0],
        ctx_per_slot=request.ctx_per_slot, parallel=request.parallel, port=port,
        chat_template=request.chat_template, pooling=request.pooling, api_key_file=key_file,
    )


@dataclass(frozen=True)
class CoordinatorSnapshot:
    id: str
    model: str
    state: str  # starting, running, exited
    pid: int
    url: str
    last_exit: str
    last_output: tuple[str, ...]
    backend_lost: bool
    state_since_unix_ms: int


class HostedCoordinator:
    """One llama-server this agent runs: spawned, read, health-checked, reported; never restarted."""

    def __init__(self, request: CoordinatorRequest, keys: frozenset[str], proc: asyncio.subprocess.Process,
                 port: int, log_path: Path, url: str, on_change: Callable[[], None]) -> None:
        self.request = request
        self.keys = keys
        self.proc = proc
        self.port = port
        self.log_path = log_path
        self.url = url
        self.state = "starting"
        self.state_since = time.time()
        self.last_exit = ""
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self.backend_lost = False
        self._on_change = on_change
        self._reader = Supervised(f"output of coordinator {request.id}", self._read_output)
        self._watcher = Supervised(f"coordinator {request.id}", self._watch, on_failure=self._crashed)

    def _crashed(self, failure: object, exc: Exception) -> None:
        """The watcher raised what nobody expected: nobody would say when the child ends, so it ends now."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self._set("exited", f"its watcher failed: {exc!r}")

    def accepts(self, presented: str) -> bool:
        """Whether an Authorization header carries this coordinator's key (constant time, every key)."""
        given = presented.removeprefix("Bearer ").encode()
        return any([hmac.compare_digest(key.encode(), given) for key in self.keys])

    def _set(self, state: str, last_exit: str = "") -> None:
        if self.state == "exited":
            return  # how it ended is said once
        self.state, self.state_since = state, time.time()
        if last_exit:
            self.last_exit = last_exit
        log.info("coordinator %s (%s): %s%s", self.request.id[:8], self.request.model, state,
                 f" ({last_exit})" if last_exit else "")
        self._on_change()

    async def _read_output(self) -> None:
        """Every line, always (llama-server blocks on a full pipe); the log file is best effort."""
        assert self.proc.stdout is not None
        sink: BinaryIO | None = None
        try:
            sink = self.log_path.open("ab", buffering=0)
        except OSError as exc:
            log.warning("coordinator %s: no log file (%s); its output is kept in memory only", self.request.id[:8], exc)
        try:
            while line := await self.proc.stdout.readline():
                text = line.decode(errors="replace").rstrip()
                self.output.append(text)
                if RPC_BACKEND_LOST in text and not self.backend_lost:
                    self.backend_lost = True
                    self._on_change()
                if sink is not None:
                    try:
                        sink.write(line)
                    except OSError:
                        with contextlib.suppress(OSError):
                            sink.close()
                        sink = None  # a full disk loses the log, never the child
        finally:
            if sink is not None:
                with contextlib.suppress(OSError):
                    sink.close()

    async def _watch(self) -> None:
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + START_TIMEOUT_S
                while self.state == "starting" and not exited.done():
                    if time.monotonic() > deadline:
                        await stop_group_async(self.proc, STOP_GRACE_S)
                        self._set("exited", f"not healthy within {START_TIMEOUT_S:.0f}s")
                        return
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        # Not listening yet, or still loading (503): both mean "not yet".
                        async with session.get(f"http://127.0.0.1:{self.port}/health",
                                               timeout=aiohttp.ClientTimeout(total=2)) as reply:
                            if reply.status == 200:
                                self._set("running")
                                break
                    await asyncio.wait({exited}, timeout=HEALTH_POLL_S)
            code = await exited
            with contextlib.suppress(asyncio.TimeoutError):
                # Its last lines say why it ended (and whether an rpc-server took it down).
                await asyncio.wait_for(asyncio.shield(self._reader.task), timeout=1.0)
            self._set("exited", describe_exit(code))
        finally:
            exited.cancel()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            code = await stop_group_async(self.proc, STOP_GRACE_S)
            self._set("exited", f"stopped by the controller ({describe_exit(code)})")
        self._watcher.cancel()
        self._reader.cancel()

    def snapshot(self) -> CoordinatorSnapshot:
        return CoordinatorSnapshot(
            id=self.request.id, model=self.request.model, state=self.state, pid=self.proc.pid or 0, url=self.url,
            last_exit=self.last_exit, last_output=tuple(self.output), backend_lost=self.backend_lost,
            state_since_unix_ms=int(self.state_since * 1000))


class Coordinators:
    """Every coordinator of this agent, and the proxy in front of them (one owner of both)."""

    def __init__(self, state_dir: Path, host: str, port: int, limit: int, *,
                 llama_server: Callable[[], Path | None], models: Callable[[], Sequence[ModelFile]],
                 gpu_uuids: Callable[[], list[str]], secrets: Callable[[], list[str]],
                 on_change: Callable[[], None], tls: ssl.SSLContext | None = None) -> None:
        self._dir = state_dir / "coordinators"
        # With the agent's TLS (and mTLS) on the gRPC port, the proxy serves the same certificate
        # and asks for the same client CA: the controller sends a coordinator's key only to the
        # identity it pinned (--agent-tls-ca).
        self._tls = tls
        self._host = host
        self._port = port
        self.limit = limit
        self._llama_server = llama_server
        self._models = models
        self._gpu_uuids = gpu_uuids
        self._secrets = secrets
        self._on_change = on_change
        self._running: dict[str, HostedCoordinator] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.proxy_endpoint = ""  # HOST:PORT once the proxy listens

    # ---- the proxy ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Listen on --rpc-host (nothing with --max-coordinators 0)."""
        if self.limit == 0:
            return
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_route("*", "/c/{id}/{tail:.*}", self._proxy)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._tls)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise UsageError(f"cannot listen on {self._host}:{self._port} for coordinators: {exc.strerror}") from None
        server = site._server  # the bound port, when --coordinator-port is 0
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self._port
        self.proxy_endpoint = f"{self._host}:{port}"
        self._session = aiohttp.ClientSession(auto_decompress=False)
        log.info("coordinator proxy on %s://%s", self._scheme, self.proxy_endpoint)

    @property
    def _scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    async def close(self) -> None:
        await asyncio.gather(*(c.stop() for c in self._running.values()))
        self._running.clear()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        coordinator = self._running.get(request.match_info["id"])
        if coordinator is None or not coordinator.accepts(request.headers.get("Authorization", "")):
            # One answer for both: which ids exist is nobody's business without a key.
            log.warning("coordinator proxy: refused %s %s from %s (unknown coordinator or wrong key)",
                        request.method, request.path[:80], request.remote)
            return web.json_response({"error": "unknown coordinator or wrong key"}, status=401)
        path = "/" + request.match_info["tail"]
        if path not in PROXIED_PATHS:
            return web.json_response({"error": f"{path[:80]} is not served through the proxy"}, status=404)
        if coordinator.state != "running" and path != "/health":
            return web.json_response({"error": f"the coordinator is {coordinator.state}"}, status=503)
        assert self._session is not None
        body = await request.read()
        headers = {"Authorization": request.headers["Authorization"]}
        if request.content_type:
            headers["Content-Type"] = request.content_type
        response = web.StreamResponse()
        try:
            async with self._session.request(request.method, f"http://127.0.0.1:{coordinator.port}{path}",
                                             data=body or None, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)) as upstream:
                response.set_status(upstream.status)
                if "Content-Type" in upstream.headers:
                    response.headers["Content-Type"] = upstream.headers["Content-Type"]
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    # A gateway that hung up fails this write: leaving the block closes the
                    # connection to llama-server, which stops the generation.
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # llama-server went away mid-request: the gateway must see a broken answer, as it
            # would from a local one (a 502 before the headers, a cut connection after them).
            log.info("coordinator %s: connection to llama-server failed: %s", coordinator.request.id[:8], exc)
            if not response.prepared:
                return web.json_response({"error": f"the coordinator's llama-server failed: {exc}"}, status=502)
            if request.transport is not None:
                request.transport.close()
            return response

    # ---- starting and stopping ------------------------------------------------------------------

    async def start(self, request: CoordinatorRequest) -> CoordinatorSnapshot:
        if self.limit == 0 or not self.proxy_endpoint:
            raise CoordinatorRefused("this agent runs no coordinators (--max-coordinators 0)")
        existing = self._running.get(request.id)
        if existing is not None:
            return existing.snapshot()
        check_request(request, self._gpu_uuids())
        live = sum(1 for c in self._running.values() if c.state != "exited")
        if live >= self.limit:
            raise TooManyCoordinators(f"{live} coordinators run here already (--max-coordinators {self.limit})")
        llama_server = self._llama_server()
        if llama_server is None:
            raise CoordinatorRefused("this agent has no llama.cpp build with llama-server (run `llamafleet build`)")
        model = find_model(self._models(), request.model_sha256)
        secrets = self._secrets()
        if not secrets:
            raise CoordinatorRefused("this agent holds no credential, so no coordinator key can be made")
        keys = frozenset(coordinator_key(secret, request.id) for secret in secrets)
        key_file, log_path = await asyncio.to_thread(self._files, request.id, keys)
        hashes = await asyncio.to_thread(self._hash_file, request, Path(model.path)) if request.tensor_hashes else None
        port = free_loopback_port()
        command = server_command(request, Path(model.path), port, key_file)
        env = server_env(request.prompt_cache_mib, hashes)
        if request.local_gpus:
            # CUDA numbers the GPUs it is shown in this order: CUDA0 is the share's first GPU.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(request.local_gpus)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU computes the local share; no GPU of ours is touched
        try:
            proc = await spawn_group_async(command.argv(llama_server), env=env)
        except OSError as exc:
            raise CoordinatorRefused(f"cannot start {llama_server}: {exc.strerror}") from None
        hosted = HostedCoordinator(request, keys, proc, port, log_path,
                                   f"{self._scheme}://{self.proxy_endpoint}/c/{request.id}", self._on_change)
        self._running[request.id] = hosted
        log.info("coordinator %s for %s: pid %d on 127.0.0.1:%d, %d local layer(s) on %s, %d rpc-server(s)",
                 request.id[:8], request.model, proc.pid, port, sum(request.local_layers),
                 ",".join(request.local_gpus) or "the CPU", len(request.rpc_endpoints))
        self._on_change()
        return hosted.snapshot()

    def _files(self, coordinator_id: str, keys: frozenset[str]) -> tuple[Path, Path]:
        """The key file (0600, read by llama-server's --api-key-file) and the log of one start."""
        self._dir.mkdir(parents=True, exist_ok=True)
        logs = sorted(self._dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[: max(len(logs) - LOGS_KEPT + 1, 0)]:
            old.unlink(missing_ok=True)
        key_file = self._dir / f"{coordinator_id}.key"
        key_file.unlink(missing_ok=True)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write("".join(f"{key}\n" for key in sorted(keys)))
        return key_file, self._dir / f"{coordinator_id}.log"

    def _hash_file(self, request: CoordinatorRequest, model: Path) -> Path | None:
        """The controller's tensor hashes under this copy's identity (size, mtime: what llama.cpp
        compares with the file it maps); None, and the coordinator hashes as a stock one, when a
        tensor would lie outside this copy (not the file the controller hashed, whatever its name)."""
        try:
            key = FileKey.of(model)
            if any(offset + size > key.size for offset, size, _ in request.tensor_hashes):
                log.warning("coordinator %s: the tensor hashes sent do not fit %s (%d bytes); not used",
                            request.id[:8], model, key.size)
                return None
            path = self._dir / f"{request.id}.hashes"
            temp = path.with_suffix(".tmp")
            temp.write_text(render(key, request.tensor_hashes))
            temp.replace(path)
        except OSError as exc:
            # They only save the coordinator's hashing: never a reason not to start it.
            log.warning("coordinator %s: cannot write its tensor hashes: %s", request.id[:8], exc.strerror or exc)
            return None
        return path

    async def stop(self, coordinator_id: str) -> CoordinatorSnapshot:
        hosted = self._running.get(coordinator_id)
        if hosted is None:
            raise UnknownCoordinator(f"no coordinator {coordinator_id[:32]} runs here")
        await hosted.stop()
        del self._running[coordinator_id]
        for suffix in (".key", ".hashes"):
            await asyncio.to_thread((self._dir / f"{coordinator_id}{suffix}").unlink, True)
        self._on_change()
        return hosted.snapshot()

    def snapshots(self) -> tuple[CoordinatorSnapshot, ...]:
        return tuple(c.snapshot() for c in sorted(self._running.values(), key=lambda c: c.request.id))
