"""The controller's Prometheus metrics (`GET /metrics`), conventional names and base units.

Counts that follow events (placement failures, rpc-server restarts) are fed by the event
log; per-request numbers by the gateway; states (nodes, coordinators, requests in flight) are
read from their owners at scrape time, so they can never drift from the truth.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterator

from llamafleet.common.loop_stalls import LoopStalls
from llamafleet.controller.coordinator.manager import CoordinatorManager
from llamafleet.controller.coordinator.states import CoordinatorState
from llamafleet.controller.events import Event
from llamafleet.controller.inventory import Inventory
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

NODE_STATES = ("ready", "unreachable", "maintenance")
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class _States(Collector):
    def __init__(self, inventory: Inventory, manager: CoordinatorManager) -> None:
        self.inventory = inventory
        self.manager = manager

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nodes = GaugeMetricFamily("llamafleet_nodes", "Nodes by state.", labels=["state"])
        tally = Tally(self.inventory.state(r) for r in self.inventory.records())
        for node_state in NODE_STATES:
            nodes.add_metric([node_state], tally[node_state])
        yield nodes
        states = GaugeMetricFamily("llamafleet_coordinator_state",
                                   "1 for the state each model's coordinator is in.", labels=["model", "state"])
        in_flight = GaugeMetricFamily("llamafleet_requests_in_flight",
                                      "Requests holding or waiting for each model.", labels=["model"])
        restarts = GaugeMetricFamily("llamafleet_coordinator_restarts", "Unplanned coordinator restarts.",
                                     labels=["model"])
        queued = GaugeMetricFamily("llamafleet_queue_depth",
                                   "Requests waiting for a free slot of each model's coordinator.", labels=["model"])
        for d in self.manager.all():
            for state in CoordinatorState:
                states.add_metric([d.model, state.value], 1.0 if d.state is state else 0.0)
            in_flight.add_metric([d.model], d.active + d.waiting)
            restarts.add_metric([d.model], d.restarts)
            queued.add_metric([d.model], self.manager.queue_depth(d.model))
        yield states
        yield in_flight
        yield restarts
        yield queued


class ControllerMetrics:
    def __init__(self, inventory: Inventory, manager: CoordinatorManager) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("llamafleet_requests", "HTTP requests answered.", ["api", "code"],
                                registry=self.registry)
        self.generated_tokens = Counter("llamafleet_generated_tokens", "Tokens generated.", ["model"],
                                        registry=self.registry)
        self.ttft = Histogram("llamafleet_time_to_first_token_seconds", "Request start to first piece.", ["model"],
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.decode_rate = Histogram("llamafleet_decode_tokens_per_second", "Decode speed per request.", ["model"],
                                     buckets=RATE_BUCKETS, registry=self.registry)
        self.load_duration = Histogram("llamafleet_model_load_duration_seconds",
                                       "Time a request waited for its model to load.", ["model"],
                                       buckets=LOAD_BUCKETS, registry=self.registry)
        self.placement_failures = Counter("llamafleet_placement_failures", "Loads refused, by reason.",
                                          ["reason"], registry=self.registry)
        self.rpc_restarts = Counter("llamafleet_rpc_server_restarts", "rpc-server restarts the agents reported.",
                                    ["node"], registry=self.registry)
        self.stream_resumes = Counter("llamafleet_stream_resumes", "Broken answers that went on (resumed) or "
                                      "ended (failed).", ["model", "outcome"], registry=self.registry)
        self.stream_pause = Histogram("llamafleet_stream_pause_seconds", "How long a resumed answer paused.",
                                      ["model"], buckets=LOAD_BUCKETS, registry=self.registry)
        self.ignored_fields = Counter("llamafleet_ignored_fields", "Request fields and options the gateway dropped "
                                      "unused, by API, kind and name.", ["api", "kind", "name"],
                                      registry=self.registry)
        self.registry.register(_States(inventory, manager))
        self.loop_stalls = LoopStalls()
        longest = Gauge("llamafleet_event_loop_stall_seconds_max",
                        "The longest time the event loop ran nothing else, since the start.", registry=self.registry)
        longest.set_function(lambda: self.loop_stalls.longest_s)
        # Set by the daemon to the event log's count (a full or read-only state dir).
        self.events_not_stored: Callable[[], int] = lambda: 0
        events_lost = Gauge("llamafleet_events_not_stored",
                            "Events that could not be written to the state database.", registry=self.registry)
        events_lost.set_function(lambda: self.events_not_stored())

    def count_ignored(self, api: str, kind: str, name: str) -> None:
        self.ignored_fields.labels(api, kind, name).inc()

    def on_event(self, event: Event) -> None:
        if event.kind == "placement.failed":
            self.placement_failures.labels(str(event.data.get("reason", "other"))).inc()
        elif event.kind == "rpc.restarted":
            self.rpc_restarts.labels(event.subject).inc()
        elif event.kind == "stream.resumed":
            self.stream_resumes.labels(event.subject, "resumed").inc()
            self.stream_pause.labels(event.subject).observe(float(event.data.get("pause_s", 0.0)))
        elif event.kind == "stream.resume_failed":
            self.stream_resumes.labels(event.subject, "failed").inc()

    def observe_generation(self, model: str, ttft_s: float | None, tokens: int, decode_s: float,
                           load_s: float) -> None:
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        if tokens:
            self.generated_tokens.labels(model).inc(tokens)
        if tokens > 1 and decode_s > 0:
            self.decode_rate.labels(model).observe(tokens / decode_s)
        if load_s > 0:
            self.load_duration.labels(model).observe(load_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
