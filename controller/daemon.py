"""`llamafleet serve`: inventory, placement, coordinators and the gateway on one event loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from llamafleet.common.settings import split_host_port
from llamafleet.common.agent_client import read_token_file
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.build import current_manifest
from llamafleet.common.llamacpp.install import Manifest, adopt_install
from llamafleet.common.restart import RestartPolicy
from llamafleet.common.supervised import RETRY_FOREVER, Supervised
from llamafleet.common.systemd import Notifier
from llamafleet.controller.api import make_routes
from llamafleet.controller.coordinator.command import CoordinatorSpec
from llamafleet.controller.coordinator.process import Coordinator
from llamafleet.controller.coordinator.remote import CoordinatorDoors, RemoteCoordinator
from llamafleet.controller.coordinator.deployment import Runtime
from llamafleet.controller.credentials import Credentials, Tls
from llamafleet.controller.coordinator.manager import CoordinatorManager
from llamafleet.controller.dashboard import dashboard_routes
from llamafleet.controller.events import EventLog
from llamafleet.controller.gateway import cors, embeddings, ollama, openai
from llamafleet.controller.gateway.catalog import Catalog
from llamafleet.controller.gateway.dispatch import Dispatcher, ResumePolicy
from llamafleet.controller.gateway.pool import OllamaPool
from llamafleet.controller.gateway.router import Router, parse_routes
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.join import join_routes
from llamafleet.controller.metrics import ControllerMetrics
from llamafleet.controller.models import (
    ModelStore,
    default_ollama_stores,
    parse_model_entries,
)
from llamafleet.controller.holders import ModelDigests
from llamafleet.controller.placement.plan import Headroom
from llamafleet.controller.planner import Planner
from llamafleet.controller.pull import PullManager
from llamafleet.controller.pull_api import pull_routes
from llamafleet.controller.settings import ControllerSettings
from llamafleet.controller.store import Store
from llamafleet.controller.tensor_hashes import TensorHashes
from llamafleet.controller.web import (
    HttpKeys,
    cancel_when_client_gone,
    count_requests,
    errors_as_json,
    guard,
    read_api_keys,
)

log = logging.getLogger(__name__)
# Open streams (a dashboard's event stream, a long answer) get this long to end on shutdown.
SHUTDOWN_GRACE_S = 3.0
# Stopping: coordinators get their SIGTERM grace and then some; every other step a few seconds.
STOP_STEP_COORDINATORS_S = 10.0
STOP_STEP_S = 4.0


async def _bounded_step(name: str, limit_s: float, step: Callable[[], Awaitable[object]]) -> None:
    """Run one shutdown step, giving up (with the step's stack in the log) after `limit_s`."""
    task = asyncio.ensure_future(step())
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if not done:
        log.error("stopping: %s did not finish within %.0f s; going on without it", name, limit_s)
        _log_tasks()
        task.cancel()
    elif not task.cancelled() and (error := task.exception()) is not None:
        log.error("stopping: %s failed: %r; going on", name, error, exc_info=error)


def _log_tasks() -> None:
    """Where every task of the event loop waits (also on SIGUSR2): the first thing to ask of a hang."""
    for task in asyncio.all_tasks():
        frames = task.get_stack(limit=8)
        where = " <- ".join(f"{f.f_code.co_name} ({f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno})"
                            for f in reversed(frames))
        log.warning("task %s: %s", task.get_name(), where or "(not started)")


def coordinator_build(settings: ControllerSettings) -> Manifest | None:
    """The llama.cpp this host would run llama-server from (None until there is one)."""
    try:
        if settings.llama_cpp is not None:
            return adopt_install(settings.llama_cpp)
        return current_manifest(settings.state_path)
    except LlamafleetError as exc:
        # Planning still works without it (protocol versions are then not compared).
        log.warning("no usable llama.cpp for the coordinator: %s", exc.message)
        return None


def model_store(settings: ControllerSettings) -> ModelStore:
    stores = [settings.ollama_models] if settings.ollama_models else default_ollama_stores()
    return ModelStore(settings.models_dir, parse_model_entries(settings.models), stores)


def status_line(settings: ControllerSettings, inventory: Inventory) -> str:
    states = [inventory.state(r) for r in inventory.records()]
    return (f"listening on {settings.listen}; {states.count('ready')} of {len(states)} node(s) ready")


async def _keep_systemd_informed(settings: ControllerSettings, inventory: Inventory, notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop itself (a wedged loop stops pinging), STATUS= on changes."""
    interval = notifier.watchdog_ping_interval_s or 5.0
    last = ""
    while True:
        await asyncio.sleep(interval)
        notifier.watchdog()
        if (line := status_line(settings, inventory)) != last:
            notifier.status(line)
            last = line


async def _llama_server(settings: ControllerSettings, planner: Planner) -> Path:
    """The llama-server to start now: a build made since the controller started is picked up.

    In a thread: adopting a plain build runs it to read its version (seconds, up to a minute)."""
    manifest = await asyncio.to_thread(coordinator_build, settings)
    planner.coordinator = manifest
    if manifest is None:
        raise LlamafleetError("the controller has no llama.cpp build to run llama-server from: "
                              "run `llamafleet build --source ...` or start it with --llama-cpp DIR")
    return Path(manifest.llama_server)


async def _reload_previous(store: Store, manager: CoordinatorManager, inventory: Inventory, wait_s: float) -> None:
    """Load again what a previous controller had loaded when it died.

    Its coordinators died with it (PR_SET_PDEATHSIG), so nothing runs twice: the placements in
    SQLite only say which models users had loaded. Each is placed afresh on today's nodes.
    """
    previous = store.placements()
    if not previous:
        return
    deadline = asyncio.get_running_loop().time() + wait_s
    # Place on nodes we have heard from: right after a start every node looks unreachable.
    while any(r.last_heartbeat is None for r in inventory.records()) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    for model, plan in previous.items():
        store.remove_placement(model)
        try:
            deployment = manager.deployment(model)
            await deployment.acquire(int(plan.get("estimate", {}).get("ctx") or 0))
        except LlamafleetError as exc:
            # Gone or no longer fitting: the next request says so; the others still load.
            log.warning("not reloading %s: %s", model, exc.message)
            continue
        deployment.release()
        log.info("reloaded %s, loaded when the previous controller stopped", model)


def read_http_keys(settings: ControllerSettings) -> HttpKeys:
    api = read_api_keys(settings.api_key_file) if settings.api_key_file is not None else None
    admin = read_api_keys(settings.admin_key_file, "admin key") if settings.admin_key_file is not None else None
    return HttpKeys(api, admin, split_host_port(settings.listen)[0], settings.origins)


def make_app(settings: ControllerSettings, keys: HttpKeys, inventory: Inventory, planner: Planner,
             manager: CoordinatorManager, router: Router, dispatcher: Dispatcher, events: EventLog,
             metrics: ControllerMetrics, credentials: Credentials, pulls: PullManager) -> web.Application:
    # The guard is always there: with no key configured at all, control routes still need loopback.
    middlewares = [count_requests(metrics), cors.preflights(keys.origins), guard(keys, events.record), errors_as_json,
                   cancel_when_client_gone]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_request_bytes)
    app.on_response_prepare.append(cors.allow_origin_header(keys.origins))
    app.add_routes(make_routes(inventory, planner, manager, router, events, metrics, credentials, pulls))
    app.add_routes(pull_routes(pulls, planner, inventory))
    app.add_routes(join_routes(credentials, inventory))
    app.add_routes(dashboard_routes())
    catalog = Catalog()
    app.add_routes(ollama.make_routes(dispatcher, catalog, settings.max_request_bytes))
    app.add_routes(openai.make_routes(dispatcher, catalog, settings.max_request_bytes))
    app.add_routes(embeddings.make_routes(dispatcher, settings.max_request_bytes))
    return app


async def serve(settings: ControllerSettings, notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier()
    settings.state_path.mkdir(parents=True, exist_ok=True)
    shared_path = settings.shared_token_path
    shared = read_token_file(shared_path) if shared_path is not None else None
    models = model_store(settings)
    routes = parse_routes(settings.routes)
    # Every configuration error before anything starts: a bad file then costs nothing to undo.
    keys = read_http_keys(settings)

    store = Store(settings.state_path / "controller.sqlite3")
    agent_tls = Tls(settings.agent_tls_ca, settings.agent_tls_cert, settings.agent_tls_key)
    credentials = Credentials(store, shared, agent_tls)
    if shared is not None:
        log.warning("DEPRECATED: %s is a fleet-wide agent token, sent to every node without a credential of "
                    "its own, including any address added to the inventory: whoever answers there can "
                    "replay it against every worker. Let agents join (`llamafleet token create`) or add them "
                    "with `llamafleet node add --credential-file`, then drop this option.", shared_path)
    events = EventLog(store)
    inventory = Inventory(store, credentials.target, settings.heartbeat_interval_s, settings.unreachable_after_s,
                          events=events.record)
    await inventory.start(settings.agents)
    digests = ModelDigests(settings.state_path)
    planner = Planner(models, inventory, await asyncio.to_thread(coordinator_build, settings),
                      Headroom(settings.headroom_fraction, settings.headroom_min), settings.parallel,
                      settings.default_ctx, settings.max_parallel, digests)
    # One HTTP client for everything the controller calls: coordinators and pool nodes. A new
    # connection per request: a kept-alive one that llama-server is closing fails the request
    # that reuses it ("Can not write request body"), and with turns at the slots a freed
    # connection is reused at once; a loopback or LAN connect costs well under a millisecond.
    # Coordinators on workers are reached through their agent's proxy with their own key, which
    # the doors add to their requests and to no other (controller/coordinator/remote.py).
    doors = CoordinatorDoors(tls_only=settings.agent_tls_ca is not None)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True, ssl=agent_tls.ssl_context()),
                                    middlewares=(doors.middleware,))
    planner.coordinator_mode = settings.coordinator

    async def start_remote(spec: CoordinatorSpec) -> Coordinator:
        return await RemoteCoordinator.start(inventory, doors, spec)

    runtime = Runtime(llama_server=lambda: _llama_server(settings, planner),
                      log_root=settings.state_path / "logs" / "coordinators", session=session,
                      policy=RestartPolicy(start_timeout_s=settings.load_timeout_s), events=events.record,
                      start_remote=start_remote)
    tensor_hashes = TensorHashes(settings.state_path)
    planner.tensor_hashes = tensor_hashes
    manager = CoordinatorManager(planner, inventory, store, runtime, settings.keep_alive, settings.prompt_cache_mib,
                                 tensor_hashes)
    metrics = ControllerMetrics(inventory, manager)
    metrics.events_not_stored = lambda: events.write_failures
    events.listen(metrics.on_event)
    stall_watch = Supervised("event loop stall watch", metrics.loop_stalls.watch, restart=RETRY_FOREVER,
                             events=events.record, subject="controller")
    stray_reaper = Supervised("stray coordinator reaper", lambda: manager.reap_strays(doors), restart=RETRY_FOREVER,
                              events=events.record, subject="controller")
    header_reader = Supervised("model header read-ahead", planner.keep_headers_read, restart=RETRY_FOREVER,
                               events=events.record, subject="controller")
    pool = OllamaPool(settings.ollama_nodes, session)
    await pool.start()
    router = Router(planner, pool, routes, settings.ollama_node_memory)
    dispatcher = Dispatcher(manager, router, pool, session, metrics,
                            ResumePolicy(settings.resume, settings.resume_timeout, settings.resume_attempts))
    pulls = PullManager(models, inventory, digests, events.record, settings.pull_rate_limit, tensor_hashes)
    app = make_app(settings, keys, inventory, planner, manager, router, dispatcher, events, metrics, credentials, pulls)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    host, port = split_host_port(settings.listen)

    async def close_all() -> None:
        # Coordinators first: the HTTP side may still be streaming from them. Every step is
        # bounded: a stop that hangs on one of them still ends, and the log says which.
        steps: list[tuple[str, float, Callable[[], Awaitable[object]]]] = [
            ("stray coordinator reaper", STOP_STEP_S, stray_reaper.stop),
            ("coordinators", STOP_STEP_COORDINATORS_S, manager.close),
            ("HTTP server", STOP_STEP_S, runner.cleanup),
            # Pulls in flight are cancelled: the nodes keep what arrived, for the next pull to resume.
            ("pulls", STOP_STEP_S, pulls.close),
            ("Ollama pool", STOP_STEP_S, pool.close),
            ("HTTP client", STOP_STEP_S, session.close),
            ("inventory", STOP_STEP_S, inventory.close),
            # Stops a hash in progress at its next chunk, so exit does not wait for a large file.
            ("model digests", STOP_STEP_S, lambda: asyncio.to_thread(digests.close)),
            ("tensor hashes", STOP_STEP_S, lambda: asyncio.to_thread(tensor_hashes.close)),
            ("event loop stall watch", STOP_STEP_S, stall_watch.stop),
            ("model header read-ahead", STOP_STEP_S, header_reader.stop),
        ]
        for name, limit_s, step in steps:
            await _bounded_step(name, limit_s, step)
        store.close()

    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await close_all()
        raise LlamafleetError(f"cannot listen on {settings.listen}: {exc.strerror}") from None
    reloading = asyncio.create_task(_reload_previous(store, manager, inventory, settings.unreachable_after_s * 2),
                                    name="reload placements")
    log.info("controller listening on http://%s; %d node(s), %d Ollama pool node(s)", settings.listen,
             len(inventory.records()), len(pool.nodes))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR2, _log_tasks)
    notifier.ready(status_line(settings, inventory))
    pinger = Supervised("systemd notifier", lambda: _keep_systemd_informed(settings, inventory, notifier),
                        restart=RETRY_FOREVER, events=events.record, subject="controller")
    try:
        await stop.wait()
        notifier.stopping()
    finally:
        pinger.cancel()
        reloading.cancel()
        await close_all()
