"""The Ollama pool: ordinary Ollama servers that take the models one of them can hold.

Each node is checked every few seconds (`GET /api/version` for health, `GET /api/tags` for
what it has). A request goes to the healthy node with the fewest requests in flight among
those that have the model; a node that fails a request is marked down and skipped until its
next good check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.restart import RestartPolicy
from llamafleet.common.supervised import Supervised, TaskFailure
from llamafleet.controller.models import InvalidModelName, parse_model_name

log = logging.getLogger(__name__)
CHECK_INTERVAL_S = 5.0
CHECK_TIMEOUT = aiohttp.ClientTimeout(total=3)
# The checker, should it raise what nobody expected, checks again after a capped back-off, forever.
CHECKER_RESTART = RestartPolicy(initial_s=CHECK_INTERVAL_S, max_s=60.0, max_failures=1_000_000, healthy_reset_s=60.0)


@dataclass
class PoolNode:
    url: str
    healthy: bool = False
    version: str = ""
    models: set[str] = field(default_factory=set)  # canonical names
    in_flight: int = 0
    error: str = "not checked yet"
    checked_at: float = 0.0

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "healthy": self.healthy, "version": self.version, "in_flight": self.in_flight,
                "models": sorted(self.models), "error": self.error}


def canonical_or_none(name: Any) -> str | None:
    try:
        return parse_model_name(name).short
    except InvalidModelName:
        # A pool node listing a name we cannot parse: we cannot route to it by that name.
        return None


class OllamaPool:
    def __init__(self, urls: tuple[str, ...], session: aiohttp.ClientSession,
                 interval_s: float = CHECK_INTERVAL_S) -> None:
        self.nodes = [PoolNode(u.rstrip("/")) for u in urls]
        self._session = session
        self._interval_s = interval_s
        self._task: Supervised | None = None

    async def start(self) -> None:
        if self.nodes:
            await asyncio.gather(*(self.check(n) for n in self.nodes))
            self._task = Supervised("ollama pool checks", self._check_forever, on_failure=self._checks_failed,
                                    restart=CHECKER_RESTART)

    async def close(self) -> None:
        if self._task is not None:
            await self._task.stop()

    def _checks_failed(self, failure: TaskFailure, exc: Exception) -> None:
        # A node nobody checks may be gone: none takes requests until the checks run again.
        for node in self.nodes:
            self.mark_down(node, f"its health checks failed: {failure.cause}")

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await asyncio.gather(*(self.check(n) for n in self.nodes))

    async def check(self, node: PoolNode) -> None:
        try:
            async with self._session.get(f"{node.url}/api/version", timeout=CHECK_TIMEOUT) as reply:
                reply.raise_for_status()
                node.version = str((await reply.json()).get("version", ""))
            async with self._session.get(f"{node.url}/api/tags", timeout=CHECK_TIMEOUT) as reply:
                reply.raise_for_status()
                tags = (await reply.json()).get("models") or []
            names = {canonical_or_none(t.get("model") or t.get("name")) for t in tags if isinstance(t, dict)}
            node.models = {n for n in names if n}
            if not node.healthy:
                log.info("ollama node %s is up (%d models)", node.url, len(node.models))
            node.healthy, node.error = True, ""
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
            # Down, not Ollama, or garbage: this node takes no requests until a check passes.
            self.mark_down(node, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        node.checked_at = time.monotonic()

    def mark_down(self, node: PoolNode, error: str) -> None:
        if node.healthy:
            log.warning("ollama node %s is down: %s", node.url, error)
        node.healthy, node.error = False, error

    def holders(self, model: str) -> list[PoolNode]:
        """Healthy nodes that have `model`, fewest requests in flight first."""
        key = canonical_or_none(model)
        return sorted((n for n in self.nodes if n.healthy and key in n.models), key=lambda n: n.in_flight)

    def models(self) -> set[str]:
        return {m for n in self.nodes if n.healthy for m in n.models}


class PoolUnavailable(LlamafleetError):
    """Every pool node that has the model failed."""
