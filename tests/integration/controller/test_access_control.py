"""Who may use which route, against a real controller process (no agents needed).

The route list comes from the controller's own router, so a route added later is covered
without anyone remembering to list it here. A peer outside loopback cannot be made on this
test network (127.0.0.0/8 only): tests/unit/controller/test_access.py judges such requests.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from llamafleet.common.llamacpp.probe import free_loopback_port
from llamafleet.controller.access import Access, route_access
from llamafleet.controller.daemon import make_app
from llamafleet.controller.settings import ControllerSettings
from llamafleet.controller.web import HttpKeys
from tests.integration.agent.harness import wait_for
from tests.integration.controller.harness import LLAMAFLEET

pytestmark = pytest.mark.integration
API_KEY = "lf-api-key-for-access-tests"
ADMIN_KEY = "lf-admin-key-for-access-tests"
WRONG_KEY = "lf-wrong-key-never-to-be-logged"
STREAMS = {"/llamafleet/v1/events/stream"}


@dataclass
class Controller:
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def send(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
             source: str = "127.0.0.1", key: str | None = None) -> tuple[int, Any]:
        """One request from `source`; a `Host` in `headers` replaces the real one."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(source, 0))
        headers = dict(headers or {}) | ({"Authorization": f"Bearer {key}"} if key else {})
        try:
            connection.request(method, path, body=body, headers=headers)
            reply = connection.getresponse()
            if path.split("?")[0] in STREAMS:
                return reply.status, None  # an event stream never ends: its status is enough
            raw = reply.read()
            return reply.status, json.loads(raw) if raw.startswith((b"{", b"[")) else raw
        finally:
            connection.close()

    def nodes(self, key: str | None = None) -> list[dict[str, Any]]:
        status, body = self.send("GET", "/llamafleet/v1/nodes", key=key)
        assert status == 200, body
        return body

    def cli(self, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        clean = {k: v for k, v in os.environ.items() if k not in ("LLAMAFLEET_API_KEY", "LLAMAFLEET_ADMIN_KEY")}
        return subprocess.run([LLAMAFLEET, *args, "--controller", self.url], capture_output=True, text=True,
                              timeout=60, env=clean | env)


@contextmanager
def running_controller(tmp: Path, *args: str) -> Iterator[Controller]:
    tmp.mkdir(parents=True, exist_ok=True)
    token = tmp / "token"
    token.write_text("fleet-token-for-tests\n")
    token.chmod(0o600)
    controller = Controller(free_loopback_port(), tmp / "controller.log")
    with controller.log_path.open("ab") as log:
        proc = subprocess.Popen([LLAMAFLEET, "serve", "--listen", f"127.0.0.1:{controller.port}", "--token-file",
                                 str(token), "--state-dir", str(tmp / "state"), *args],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, controller.log_path.read_text()
            try:
                return controller.send("GET", "/llamafleet/v1/health")[0] == 200
            except OSError:
                return False

        wait_for(healthy, 20, "the controller's health route")
        yield controller
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    """API keys and an admin key configured."""
    tmp = tmp_path_factory.mktemp("locked")
    (tmp / "api-keys").write_text(f"# inference\n{API_KEY}\n")
    (tmp / "admin-keys").write_text(f"# operators\n{ADMIN_KEY}\n")
    with running_controller(tmp, "--api-key-file", str(tmp / "api-keys"),
                            "--admin-key-file", str(tmp / "admin-keys")) as controller:
        yield controller


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Controller]:
    """No key configured at all: the settings a LAN attacker finds."""
    with running_controller(tmp_path_factory.mktemp("default")) as controller:
        yield controller


def control_routes() -> list[tuple[str, str]]:
    """(method, example path) for every route of the real app that needs the admin credential."""
    app = make_app(ControllerSettings(), HttpKeys(None, None, "127.0.0.1"), *[mock.Mock() for _ in range(9)])
    found = set()
    for route in app.router.routes():
        assert route.resource is not None, route
        method, template = ("GET" if route.method == "*" else route.method), route.resource.canonical
        if route_access(method, template) is Access.ADMIN:
            found.add((method, re.sub(r"\{[^}]+\}", "127.0.0.1:1", template)))
    return sorted(found)


CONTROL = control_routes()
JSON = {"Content-Type": "application/json"}


def test_the_route_list_is_the_real_one() -> None:
    assert {("POST", "/llamafleet/v1/nodes"), ("DELETE", "/llamafleet/v1/nodes/127.0.0.1:1"),
            ("POST", "/llamafleet/v1/nodes/127.0.0.1:1/maintenance"), ("POST", "/llamafleet/v1/plan"),
            ("POST", "/llamafleet/v1/stop"), ("GET", "/llamafleet/v1/ps"), ("GET", "/llamafleet/v1/events"),
            ("GET", "/llamafleet/v1/events/stream"), ("GET", "/llamafleet/v1/logs/127.0.0.1:1"),
            ("GET", "/llamafleet/v1/pool"), ("GET", "/metrics")} <= set(CONTROL)
    assert not any(path.startswith(("/api/", "/v1/")) or path == "/llamafleet/v1/health" for _, path in CONTROL)


@pytest.mark.parametrize(("method", "path"), CONTROL)
def test_an_api_key_opens_no_control_route(locked: Controller, method: str, path: str) -> None:
    assert locked.send(method, path, JSON, b"{}", key=API_KEY)[0] == 403
    assert locked.send(method, path, JSON, b"{}")[0] == 401  # loopback is not enough once an admin key is set
    assert locked.send(method, path, JSON, b"{}", key=WRONG_KEY)[0] == 401
    assert locked.send(method, path, JSON, b"{}", key=ADMIN_KEY)[0] not in (401, 403)
    assert locked.nodes(ADMIN_KEY) == []  # `{}` adds nothing, and nothing refused got through


def test_the_admin_key_opens_the_api_too_and_the_api_key_still_does(locked: Controller) -> None:
    for key in (API_KEY, ADMIN_KEY):
        assert locked.send("GET", "/api/tags", key=key)[0] == 200
        assert locked.send("GET", "/v1/models", key=key)[0] == 200
    assert locked.send("GET", "/api/tags")[0] == 401
    assert locked.send("GET", "/llamafleet/v1/health")[0] == 200


def test_a_refusal_is_an_event_with_route_peer_and_reason_but_never_the_key(locked: Controller) -> None:
    body = json.dumps({"address": "127.0.0.1:50999"}).encode()
    status, reply = locked.send("POST", "/llamafleet/v1/nodes", JSON, body, source="127.0.0.9", key=WRONG_KEY)
    assert status == 401 and "admin key" in reply["error"]
    status, events = locked.send("GET", "/llamafleet/v1/events?limit=10000", key=ADMIN_KEY)
    assert status == 200
    mine = [e for e in events if e["kind"] == "auth.refused" and e["data"]["peer"] == "127.0.0.9"]
    assert [(e["data"]["route"], e["data"]["reason"]) for e in mine] == [("POST /llamafleet/v1/nodes",
                                                                         "wrong admin key")]
    assert locked.nodes(ADMIN_KEY) == []
    for text in (json.dumps(events), locked.log_path.read_text()):
        assert WRONG_KEY not in text and ADMIN_KEY not in text and API_KEY not in text
    assert "refused POST /llamafleet/v1/nodes from 127.0.0.9: wrong admin key" in locked.log_path.read_text()


def test_the_cli_sends_the_admin_key_to_control_routes(locked: Controller) -> None:
    assert locked.cli("nodes", "--json", env={"LLAMAFLEET_ADMIN_KEY": ADMIN_KEY}).returncode == 0
    assert locked.cli("nodes", "--json", env={"LLAMAFLEET_API_KEY": API_KEY,
                                              "LLAMAFLEET_ADMIN_KEY": ADMIN_KEY}).returncode == 0
    refused = locked.cli("node", "add", "127.0.0.1:50999", env={"LLAMAFLEET_API_KEY": API_KEY})
    assert refused.returncode == 1 and "LLAMAFLEET_ADMIN_KEY" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert locked.nodes(ADMIN_KEY) == []


def test_a_cross_origin_form_post_adds_no_node(default: Controller) -> None:
    """What a web page on a LAN user's browser can send to a loopback controller without asking."""
    page = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    body = json.dumps({"address": "127.0.0.1:50999"}).encode()
    assert default.send("POST", "/llamafleet/v1/nodes", page, body)[0] == 403
    assert default.send("POST", "/llamafleet/v1/nodes", JSON | {"Origin": "http://evil.example"}, body)[0] == 403
    assert default.send("POST", "/llamafleet/v1/nodes", {"Content-Type": "text/plain"}, body)[0] == 415
    assert default.send("POST", "/llamafleet/v1/nodes", {"Content-Type": "application/x-www-form-urlencoded",
                                                         "Sec-Fetch-Site": "cross-site"}, body)[0] == 403
    assert default.send("DELETE", "/llamafleet/v1/nodes/127.0.0.1:50999", {"Origin": "null"})[0] == 403
    assert default.nodes() == []


def test_the_dashboard_own_origin_and_the_cli_still_change_things(default: Controller) -> None:
    own = JSON | {"Origin": f"http://127.0.0.1:{default.port}"}
    body = json.dumps({"address": "127.0.0.1:50999"}).encode()
    assert default.send("POST", "/llamafleet/v1/nodes", own, body)[0] == 201
    assert [n["address"] for n in default.nodes()] == ["127.0.0.1:50999"]
    assert default.cli("node", "remove", "127.0.0.1:50999", env={}).returncode == 0
    assert default.nodes() == []


def test_a_rebound_name_is_refused_without_an_admin_key(default: Controller) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1, but the browser says whom it asked."""
    status, reply = default.send("GET", "/llamafleet/v1/nodes", {"Host": f"evil.example:{default.port}"})
    assert status == 403 and "Host" in reply["error"]
    assert default.send("GET", "/metrics", {"Host": f"evil.example:{default.port}"})[0] == 403
    for host in (f"localhost:{default.port}", f"127.0.0.1:{default.port}", f"127.0.0.7:{default.port}"):
        assert default.send("GET", "/llamafleet/v1/nodes", {"Host": host})[0] == 200


def test_the_ollama_and_openai_routes_answer_pages_of_this_host_and_not_other_sites(default: Controller) -> None:
    # As Ollama without OLLAMA_ORIGINS: a page of another site must not drive the API from a
    # visitor's browser (keep_alive 0 unloads a model), nor reach it by a rebound name.
    unload = json.dumps({"model": "gemma", "keep_alive": 0}).encode()
    for headers in ({"Origin": "http://evil.example"}, {"Content-Type": "text/plain", "Origin": "null"},
                    {"Host": f"evil.example:{default.port}"}):
        assert default.send("POST", "/api/generate", headers, unload)[0] == 403
        assert default.send("GET", "/v1/models", headers)[0] == 403
    for headers in ({}, {"Origin": "http://localhost:3000"}, {"Origin": f"http://127.0.0.1:{default.port}"},
                    {"Host": f"localhost:{default.port}"}):
        assert default.send("GET", "/api/tags", headers)[0] == 200
        assert default.send("GET", "/v1/models", headers)[0] == 200
    # What a curl user or an SDK sends (no Origin) is unchanged; the liveness probe stays public.
    assert default.send("GET", "/api/version", {"Origin": "http://evil.example"})[0] == 200
