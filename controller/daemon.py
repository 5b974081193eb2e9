"""`llamafleet serve`: the inventory, the planner and the HTTP API on one event loop."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from llamafleet.agent.settings import split_host_port
from llamafleet.common.agent_client import AgentAddress, read_token_file
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.llamacpp.build import current_manifest
from llamafleet.common.llamacpp.install import Manifest, adopt_install
from llamafleet.common.systemd import Notifier
from llamafleet.controller.api import make_app
from llamafleet.controller.inventory import Inventory
from llamafleet.controller.models import ModelStore, default_ollama_stores, parse_model_entries
from llamafleet.controller.placement.plan import Headroom
from llamafleet.controller.planner import Planner
from llamafleet.controller.settings import ControllerSettings
from llamafleet.controller.store import Store

log = logging.getLogger(__name__)


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


async def serve(settings: ControllerSettings, notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier()
    settings.state_path.mkdir(parents=True, exist_ok=True)
    token = read_token_file(settings.token_path)
    models = model_store(settings)

    def target(address: str) -> AgentAddress:
        return AgentAddress(address, token, settings.agent_tls_ca, settings.agent_tls_cert, settings.agent_tls_key)

    store = Store(settings.state_path / "controller.sqlite3")
    inventory = Inventory(store, target, settings.heartbeat_interval_s, settings.unreachable_after_s)
    await inventory.start(settings.agents)
    coordinator = coordinator_build(settings)
    planner = Planner(models, inventory, coordinator, Headroom(settings.headroom_fraction, settings.headroom_min),
                      settings.parallel, settings.default_ctx)
    runner = web.AppRunner(make_app(inventory, planner), access_log=None)
    await runner.setup()
    host, port = split_host_port(settings.listen)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await inventory.close()
        store.close()
        raise LlamafleetError(f"cannot listen on {settings.listen}: {exc.strerror}") from None
    log.info("controller listening on http://%s; %d node(s)", settings.listen, len(inventory.records()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier.ready(status_line(settings, inventory))
    pinger = asyncio.create_task(_keep_systemd_informed(settings, inventory, notifier))
    try:
        await stop.wait()
        notifier.stopping()
    finally:
        pinger.cancel()
        await runner.cleanup()
        await inventory.close()
        store.close()
