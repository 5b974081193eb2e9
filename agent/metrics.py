"""The agent's Prometheus metrics, on an optional port (`--metrics-listen HOST:PORT`).

Read from the agent's snapshot at scrape time: the numbers are the ones `status` reports.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from llamafleet.agent.core import AgentSnapshot
from llamafleet.common.settings import split_host_port
from llamafleet.agent.supervisor import RpcState
from llamafleet.common.errors import LlamafleetError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector


class AgentCollector(Collector):
    def __init__(self, snapshot: object) -> None:
        self._snapshot = snapshot  # a callable returning AgentSnapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | InfoMetricFamily]:
        snap: AgentSnapshot = self._snapshot()  # type: ignore[operator]
        rpc = snap.rpc_server
        yield GaugeMetricFamily("llamafleet_agent_rpc_server_up", "1 while the rpc-server is running.",
                                value=1.0 if rpc.state is RpcState.RUNNING else 0.0)
        yield CounterMetricFamily("llamafleet_agent_rpc_server_restarts", "Unplanned rpc-server restarts.",
                                  value=rpc.restarts)
        yield GaugeMetricFamily("llamafleet_agent_rpc_server_generation",
                                "Incarnation of the rpc-server (a new one holds no tensors).", value=rpc.generation)
        total = GaugeMetricFamily("llamafleet_agent_device_total_bytes", "Advertised device memory.",
                                  labels=["device", "kind"])
        free = GaugeMetricFamily("llamafleet_agent_device_free_bytes", "Advertised free device memory.",
                                 labels=["device", "kind"])
        for device in snap.devices:
            name = f"{device.kind}{device.index}" if device.kind == "gpu" else device.kind
            total.add_metric([name, device.kind], device.total_bytes)
            free.add_metric([name, device.kind], device.free_bytes)
        yield total
        yield free
        yield GaugeMetricFamily("llamafleet_agent_host_memory_available_bytes", "Host memory available.",
                                value=snap.host.available_bytes)
        info = InfoMetricFamily("llamafleet_agent_build", "The llama.cpp build the agent runs.")
        if snap.build is not None:
            info.add_metric([], {"commit": snap.build.commit or "", "source_id": snap.build.source_id,
                                 "rpc_protocol": snap.build.rpc_protocol_version,
                                 "backends": ",".join(snap.build.backends)})
        yield info


async def start_metrics_server(snapshot: object, listen: str) -> web.AppRunner:
    registry = CollectorRegistry()
    registry.register(AgentCollector(snapshot))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = split_host_port(listen)
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise LlamafleetError(f"cannot serve metrics on {listen}: {exc.strerror}") from None
    return runner
