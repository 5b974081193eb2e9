"""Routing between the Ollama pool and the fleet, explained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamafleet.common.errors import UsageError
from llamafleet.controller.gateway.pool import OllamaPool
from llamafleet.controller.gateway.router import Router, parse_routes
from llamafleet.controller.models import ModelNotFound, ModelStore
from llamafleet.controller.placement.plan import Headroom
from llamafleet.controller.planner import Planner
from tests.fixtures.synthetic_gguf import LLAMA_8B, write_model


class NoInventory:
    def node_views(self, load: Any = None) -> list[Any]:
        return []


@pytest.fixture
def router_parts(tmp_path: Path) -> tuple[Planner, OllamaPool]:
    write_model(tmp_path / "llama8b.gguf", LLAMA_8B)
    planner = Planner(ModelStore(tmp_path), NoInventory(), None, Headroom(), 1, 4096)  # type: ignore[arg-type]
    pool = OllamaPool(("http://127.0.0.1:1", "http://127.0.0.1:2"), session=None)  # type: ignore[arg-type]
    pool.nodes[0].healthy, pool.nodes[0].models = True, {"llama8b:latest", "qwen3:4b"}
    pool.nodes[1].healthy, pool.nodes[1].models = False, {"llama8b:latest"}
    return planner, pool


def test_a_model_a_pool_node_holds_goes_to_the_pool(router_parts: tuple[Planner, OllamaPool]) -> None:
    planner, pool = router_parts
    route = Router(planner, pool, {}, 64 * 2**30).route("llama8b")
    assert route.target == "pool" and "fits one Ollama node" in route.reason
    assert [n.url for n in route.nodes] == ["http://127.0.0.1:1"]  # the down node is skipped


def test_a_model_larger_than_a_pool_node_goes_to_the_fleet(router_parts: tuple[Planner, OllamaPool]) -> None:
    planner, pool = router_parts
    route = Router(planner, pool, {}, 4 * 2**30).route("llama8b")
    assert route.target == "fleet" and "more than one Ollama node's 4.0 GiB" in route.reason


def test_least_in_flight_pool_node_first(router_parts: tuple[Planner, OllamaPool]) -> None:
    planner, pool = router_parts
    pool.nodes[1].healthy = True
    pool.nodes[0].in_flight = 3
    assert [n.url for n in Router(planner, pool, {}, 0).route("llama8b").nodes] == ["http://127.0.0.1:2",
                                                                                   "http://127.0.0.1:1"]


def test_models_only_the_pool_has_and_unknown_models(router_parts: tuple[Planner, OllamaPool]) -> None:
    planner, pool = router_parts
    router = Router(planner, pool, {}, 0)
    assert router.route("qwen3:4b").target == "pool"
    with pytest.raises(ModelNotFound):
        router.route("nothing")


def test_overrides_win_and_are_checked(router_parts: tuple[Planner, OllamaPool]) -> None:
    planner, pool = router_parts
    routes = parse_routes(("llama8b=fleet",))
    assert Router(planner, pool, routes, 64 * 2**30).route("llama8b:latest").target == "fleet"
    with pytest.raises(UsageError, match="MODEL=pool or MODEL=fleet"):
        parse_routes(("llama8b=gpu",))
    pool.nodes[0].healthy = False
    with pytest.raises(ModelNotFound, match="no healthy pool node"):
        Router(planner, pool, parse_routes(("llama8b=pool",)), 0).route("llama8b")
