"""Optional gateway API keys: every Ollama/OpenAI route but liveness needs one, and keys never leak.

The control routes' own credential (the admin key) is tests/integration/controller/test_access_control.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest

from llamafleet.common.llamacpp.install import Manifest
from tests.integration.controller.harness import Fleet, running_fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]
KEY = "lf-test-key-0123456789abcdef"
OTHER_KEY = "lf-second-key-for-rotation"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, llama_cpp: Manifest, test_model: Path) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("auth")
    keys = tmp / "api-keys"
    keys.write_text(f"# the gateway's keys\n{KEY}\n\n{OTHER_KEY}\n")
    with running_fleet(tmp / "fleet", llama_cpp, test_model, agents=2,
                       controller_args=("--api-key-file", str(keys))) as running:
        yield running


def status(fleet: Fleet, method: str, path: str, key: str | None = None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(fleet.url + path, data=data, method=method,
                                                           headers=headers), timeout=60) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/chat", {"model": "gemma", "messages": [{"role": "user", "content": "x"}]}),
    ("POST", "/api/generate", {"model": "gemma", "prompt": ""}),
    ("GET", "/api/tags", None), ("GET", "/api/ps", None), ("POST", "/api/show", {"model": "gemma"}),
    ("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"model": "gemma", "messages": []}),
])
def test_every_api_route_but_liveness_needs_a_key(fleet: Fleet, method: str, path: str, body: dict | None) -> None:
    assert status(fleet, method, path, None, body) == 401
    assert status(fleet, method, path, "wrong-key", body) == 401
    assert status(fleet, method, path, KEY[:-1], body) == 401


def test_the_refused_request_had_no_effect(fleet: Fleet) -> None:
    assert status(fleet, "POST", "/api/generate", "wrong-key", {"model": "gemma", "prompt": ""}) == 401
    assert status(fleet, "GET", "/api/ps", KEY) == 200
    assert json.loads(fleet.cli("ps", "--json", env_key=KEY).stdout) == []  # nothing was loaded


@pytest.mark.parametrize("path", ["/", "/api/version", "/llamafleet/v1/health"])
def test_liveness_is_public(fleet: Fleet, path: str) -> None:
    assert status(fleet, "GET", path) == 200


def test_clients_with_a_key_work_and_both_keys_are_accepted(fleet: Fleet) -> None:
    reply = ollama.Client(host=fleet.url, headers={"Authorization": f"Bearer {KEY}"}).generate(
        model="gemma", prompt="hi", options={"num_predict": 2})
    assert reply.done
    models = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key=OTHER_KEY).models.list()
    assert [m.id for m in models] == ["gemma:latest"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="nope", max_retries=0).models.list()


def test_the_cli_sends_LLAMAFLEET_API_KEY_and_says_what_is_wrong_without_it(fleet: Fleet) -> None:
    assert fleet.cli("nodes", env_key=KEY).returncode == 0
    refused = fleet.cli("run", "gemma", "hi", env_key=None)
    assert refused.returncode == 1 and "missing or wrong API key" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_api_key_is_no_control_credential_but_loopback_is_while_no_admin_key_is_set(fleet: Fleet) -> None:
    """This fleet has API keys and no admin key: the controller's own host may use the control routes."""
    assert status(fleet, "GET", "/llamafleet/v1/nodes") == 200
    assert status(fleet, "GET", "/llamafleet/v1/nodes", KEY) == 200  # neither opens nor closes them
    assert status(fleet, "POST", "/llamafleet/v1/stop", None, {"model": "not-loaded"}) == 404


def test_keys_never_appear_in_logs_or_json(fleet: Fleet) -> None:
    for args in (("nodes", "--json"), ("ps", "--json"), ("pool", "--json")):
        assert KEY not in fleet.cli(*args, env_key=KEY).stdout
    log = fleet.log_path.read_text()
    assert "refused" in log and KEY not in log and OTHER_KEY not in log and "wrong-key" not in log
    for agent in fleet.agents:
        assert agent.token not in agent.log() and agent.token not in log
