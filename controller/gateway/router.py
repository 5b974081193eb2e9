"""Which door a model goes through: the Ollama pool or a distributed coordinator, and why.

1. An operator's override (`--route MODEL=pool|fleet`) wins.
2. A model the controller does not have itself goes to a pool node that lists it.
3. A model some healthy pool node lists, and that fits one pool node's memory
   (`--ollama-node-memory`; 0 trusts the node to hold what it lists), goes to the pool.
4. Everything else is placed across the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llamafleet.common.errors import UsageError
from llamafleet.common.units import format_size
from llamafleet.controller.gateway.pool import OllamaPool, PoolNode
from llamafleet.controller.models import ModelNotFound, parse_model_name
from llamafleet.controller.planner import Planner

Target = Literal["pool", "fleet"]


@dataclass(frozen=True)
class Route:
    target: Target
    reason: str
    nodes: tuple[PoolNode, ...] = ()  # for the pool: the candidates, best first

    def to_json(self) -> dict[str, object]:
        return {"target": self.target, "reason": self.reason, "pool_nodes": [n.url for n in self.nodes]}


def parse_routes(entries: tuple[str, ...]) -> dict[str, Target]:
    """`MODEL=pool|fleet` entries from flags or config."""
    out: dict[str, Target] = {}
    for entry in entries:
        model, sep, target = entry.partition("=")
        if not sep or target not in ("pool", "fleet"):
            raise UsageError(f"--route takes MODEL=pool or MODEL=fleet, not {entry!r}")
        out[parse_model_name(model).short] = target  # type: ignore[assignment]  # checked just above
    return out


class Router:
    def __init__(self, planner: Planner, pool: OllamaPool, overrides: dict[str, Target], pool_node_memory: int) -> None:
        self.planner = planner
        self.pool = pool
        self.overrides = overrides
        self.pool_node_memory = pool_node_memory

    def route(self, model: str, ctx: int | None = None) -> Route:
        key = parse_model_name(model).short
        holders = tuple(self.pool.holders(model))
        override = self.overrides.get(key)
        if override == "fleet":
            return Route("fleet", "routed to the fleet by configuration")
        if override == "pool":
            if not holders:
                raise ModelNotFound(f"model '{model}' is routed to the Ollama pool, but no healthy pool node has it")
            return Route("pool", "routed to the Ollama pool by configuration", holders)
        try:
            _, estimate = self.planner.estimate(model, ctx)
        except ModelNotFound:
            if holders:
                return Route("pool", "only the Ollama pool has this model", holders)
            raise
        if not holders:
            why = "no healthy Ollama pool node has it" if self.pool.nodes else "no Ollama pool is configured"
            return Route("fleet", f"placed across the fleet: {why}")
        need = estimate.device_total
        if self.pool_node_memory and need > self.pool_node_memory:
            return Route("fleet", f"placed across the fleet: it needs {format_size(need)}, more than one Ollama "
                                  f"node's {format_size(self.pool_node_memory)}")
        fits = (f"{format_size(need)} fits one Ollama node's {format_size(self.pool_node_memory)}"
                if self.pool_node_memory else "a pool node lists it (no --ollama-node-memory to compare with)")
        return Route("pool", f"served by the Ollama pool: {fits}", holders)
