"""`llamafleet-agent serve`: wire the agent, its gRPC server and systemd together on one loop.

systemd protocol: READY=1 once the gRPC port is bound and the rpc-server has settled (running,
or left stopped/failed for a stated reason); WATCHDOG=1 from this loop at half WATCHDOG_USEC,
only while the supervisor's loop is turning; STATUS= one line on every change; STOPPING=1 on exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from llamafleet.agent.core import Agent
from llamafleet.agent.credential import JoinRefused, Keyring, join
from llamafleet.agent.metrics import start_metrics_server
from llamafleet.agent.node import NodeIdentity, load_node_identity
from llamafleet.agent.coordinators import Coordinators, proxy_tls
from llamafleet.agent.service import start_server
from llamafleet.agent.settings import AgentSettings
from llamafleet.agent.supervisor import TICK_S
from llamafleet.common.agent_client import read_token_file
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.supervised import RETRY_FOREVER, Supervised
from llamafleet.common.systemd import Notifier

log = logging.getLogger(__name__)
# The supervisor turns every TICK_S; staler than this and it is wedged: stop feeding the watchdog.
SUPERVISOR_STALE_S = max(10 * TICK_S, 3.0)
# How long serve waits for the rpc-server to settle before declaring READY anyway.
READY_WAIT_S = 120.0


async def _wait_settled(agent: Agent) -> None:
    deadline = time.monotonic() + READY_WAIT_S
    while not agent.supervisor.at_rest() and time.monotonic() < deadline:
        seen = agent.changes.version
        await agent.changes.wait_newer(seen, 0.5)


JOIN_RETRY_MAX_S = 30.0


def _join_token(settings: AgentSettings) -> str:
    if settings.join_token or not settings.join:
        return settings.join_token
    assert settings.join_token_file is not None  # AgentSettings insists on one of the two
    return read_token_file(settings.join_token_file)


async def _join_when_needed(settings: AgentSettings, token: str, keyring: Keyring, node: NodeIdentity) -> None:
    """Join the controller once, when configured and no credential is held; retry while it is
    unreachable (it may start after us), give up at once when it refuses the token."""
    if not settings.join or keyring.current is not None:
        if settings.join:
            log.info("already holds a node credential (%s): not joining again", keyring.source)
        return
    delay = 1.0
    while True:
        try:
            secret = await asyncio.to_thread(join, settings.join, token, settings.advertised, node.node_id,
                                             node.hostname)
        except JoinRefused as exc:
            log.error("%s: this agent accepts no calls until it is given a valid join token", exc.message)
            return
        except LlamafleetError as exc:
            log.warning("%s; trying again in %.0f s", exc.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOIN_RETRY_MAX_S)
            continue
        keyring.adopt(secret)
        log.info("joined the controller at %s as %s; the credential is in %s", settings.join, settings.advertised,
                 keyring.issued)
        return


async def _keep_systemd_informed(agent: Agent, notifier: Notifier) -> None:
    interval = notifier.watchdog_ping_interval_s
    last_status = ""
    seen = agent.changes.version
    while True:
        await agent.changes.wait_newer(seen, interval or 5.0)
        seen = agent.changes.version
        line = agent.status_line()
        if line != last_status:
            notifier.status(line)
            last_status = line
        # The stalest loop decides: any wedged supervisor is a wedged agent.
        stale_s = time.monotonic() - min(s.last_tick for s in agent.supervisors)
        if interval and stale_s < SUPERVISOR_STALE_S:
            notifier.watchdog()
        elif interval:
            log.error("a supervisor loop has not turned for %.1f s: withholding the watchdog ping", stale_s)


# A long-lived task of the agent that raised what nobody expected runs again after this back-off:
# logged once with its traceback, shown in its state (an rpc-server's `last_exit`), never a hot loop.
BACKGROUND_RESTART = RETRY_FOREVER


def supervise_background(agent: Agent, settings: AgentSettings, join_token: str, keyring: Keyring,
                         notifier: Notifier) -> list[Supervised]:
    """Start the agent's long-lived coroutines, each in a `Supervised` (common/supervised.py)."""
    tasks = [Supervised(f"rpc-server #{i} supervisor", s.run, on_failure=s.loop_failed, restart=BACKGROUND_RESTART)
             for i, s in enumerate(agent.supervisors)]
    # The watchdog is fed from the start: systemd may count it before READY=1.
    tasks.append(Supervised("systemd notifier", lambda: _keep_systemd_informed(agent, notifier),
                            restart=BACKGROUND_RESTART))
    tasks.append(Supervised("join", lambda: _join_when_needed(settings, join_token, keyring, agent.node),
                            restart=BACKGROUND_RESTART))
    if agent.models is not None:
        # The model store's rescans and hashes run beside the supervisors (its threads stop with it).
        tasks.append(Supervised("models dir", agent.models.run, restart=BACKGROUND_RESTART))
    if agent.cache_keeper is not None:
        # Verifies and bounds the rpc tensor cache; it reports a failed pass in its summary.
        tasks.append(Supervised("rpc cache keeper", agent.cache_keeper.run, restart=BACKGROUND_RESTART))
    return tasks


async def serve(settings: AgentSettings, notifier: Notifier | None = None) -> None:
    notifier = notifier or Notifier()
    state = settings.state_path
    state.mkdir(parents=True, exist_ok=True)
    # A node that is to join gets its credential from the controller, not from a file of its own.
    join_token = _join_token(settings)  # an unreadable file is a configuration error: now, not later
    keyring = Keyring(state, settings.token_file, create=not settings.join)
    if settings.token_file is not None:
        log.info("node credential from %s; a credential the controller issues later takes precedence",
                 settings.token_file)
    if settings.rpc_allow_wildcard and settings.rpc_host == "0.0.0.0":
        log.warning("!!! rpc-server will listen on 0.0.0.0: it has NO authentication; anyone who "
                    "reaches port %d can run code on this worker's devices. Firewall it to the controller. !!!",
                    settings.rpc_port)
    agent = Agent(settings, load_node_identity(state))
    agent.load_build()
    agent.coordinators = Coordinators(
        state, settings.rpc_host, settings.coordinator_port, settings.max_coordinators,
        llama_server=agent.llama_server, models=lambda: agent.models.files if agent.models else (),
        gpu_uuids=agent.gpu_uuids, secrets=keyring.held, on_change=agent.changes.bump,
        tls=proxy_tls(settings.tls_cert, settings.tls_key, settings.tls_client_ca))
    await agent.coordinators.open()
    server, port = await start_server(agent, settings, keyring)
    metrics = await start_metrics_server(agent.snapshot, settings.metrics_listen) if settings.metrics_listen else None
    log.info("agent %s listening on %s (port %d); rpc-server endpoint %s",
             agent.node.node_id, settings.listen, port, settings.rpc_endpoint)
    tasks = supervise_background(agent, settings, join_token, keyring, notifier)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # A stop during a slow start-up is honoured at once, not after the rpc-server settles.
        stopped = asyncio.ensure_future(stop.wait())
        settled = asyncio.ensure_future(_wait_settled(agent))
        await asyncio.wait({stopped, settled}, return_when=asyncio.FIRST_COMPLETED)
        settled.cancel()
        if not stop.is_set():
            notifier.ready(agent.status_line())
        await stopped
        log.info("stopping: rpc-server first, then the gRPC server")
        notifier.stopping()
    finally:
        agent.stop_threads()  # a staging or pull thread would otherwise read and write until it is done
        # Cancellation is how these tasks are asked to end (the rpc-servers stop together).
        await asyncio.gather(*(task.stop() for task in tasks))
        await agent.coordinators.close()  # its llama-servers go before the gRPC server that reports them
        await server.stop(grace=1.0)
        if metrics is not None:
            await metrics.cleanup()
