"""Route classes, the loopback and same-origin rules, and the guard judging requests whose peer
is not on loopback: a test cannot connect from such an address (its network is 127.0.0.0/8), so
the request is built with aiohttp's own test helper around a socket that reports 10.0.0.5."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from llamafleet.controller.access import (
    Access,
    is_allowed_origin,
    is_loopback_host,
    is_loopback_peer,
    is_same_origin,
    route_access,
)
from llamafleet.controller.client import key_for
from llamafleet.controller.daemon import make_app
from llamafleet.controller.settings import ControllerSettings
from llamafleet.controller.web import HttpKeys, guard, without_paths

ADMIN, API = "admin-key-0123", "api-key-4567"


def app_routes(credentials: HttpKeys, sink: Any) -> web.Application:
    """The controller's real application and router; what the routes would call is never reached."""
    events = mock.Mock(record=sink)
    return make_app(ControllerSettings(), credentials, mock.Mock(), mock.Mock(), mock.Mock(), mock.Mock(),
                    mock.Mock(), events, mock.Mock(), mock.Mock(), mock.Mock())


@pytest.mark.parametrize(("method", "template", "access"), [
    ("GET", "/", Access.PUBLIC), ("HEAD", "/", Access.PUBLIC), ("GET", "/api/version", Access.PUBLIC),
    ("GET", "/llamafleet/v1/health", Access.PUBLIC), ("GET", "/ui/{name}", Access.PUBLIC),
    ("POST", "/llamafleet/v1/health", Access.ADMIN), ("POST", "/ui/", Access.ADMIN),
    ("POST", "/api/chat", Access.INFERENCE), ("GET", "/v1/models", Access.INFERENCE),
    ("POST", "/api/version", Access.INFERENCE),
    ("POST", "/llamafleet/v1/nodes", Access.ADMIN), ("DELETE", "/llamafleet/v1/nodes/{address}", Access.ADMIN),
    ("GET", "/metrics", Access.ADMIN), ("GET", "/llamafleet/v1/events/stream", Access.ADMIN),
    ("GET", "/some/new/route", Access.ADMIN), ("GET", "/apix", Access.ADMIN), ("GET", "/v1", Access.ADMIN),
])
def test_routes_are_classed_by_template_and_unknown_ones_are_admin(method: str, template: str,
                                                                   access: Access) -> None:
    assert route_access(method, template) is access


@pytest.mark.parametrize(("peer", "trusted"), [
    ("127.0.0.1", True), ("127.4.5.6", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("192.168.1.20", False), ("::ffff:10.0.0.5", False), ("fe80::1%eth0", False),
    ("2001:db8::1", False), ("0.0.0.0", False), ("localhost", False), ("", False), (None, False),
])
def test_only_a_loopback_socket_peer_is_trusted(peer: str | None, trusted: bool) -> None:
    assert is_loopback_peer(peer) is trusted


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:11434", True), ("localhost:11434", True), ("LOCALHOST", True), ("localhost.:80", True),
    ("[::1]:11434", True), ("127.9.9.9", True), ("10.0.0.2:11434", True),  # the listen address below
    ("evil.example:11434", False), ("localhost.evil.example", False), ("127.0.0.1.nip.io", False),
    ("10.0.0.3:11434", False), ("", False), (None, False), ("user@127.0.0.1", False), ("127.0.0.1/x", False),
    ("127.0.0.1:port", False),
])
def test_host_must_be_a_loopback_name_or_the_listen_address(host: str | None, allowed: bool) -> None:
    assert is_loopback_host(host, "10.0.0.2") is allowed


def test_a_wildcard_listen_address_is_no_host_name() -> None:
    assert not is_loopback_host("0.0.0.0:11434", "0.0.0.0")
    assert not is_loopback_host("[::]:11434", "::")


@pytest.mark.parametrize(("origin", "extra", "allowed"), [
    ("http://localhost:3000", (), True), ("https://127.0.0.1", (), True), ("http://0.0.0.0:8080", (), True),
    ("app://obsidian.md", (), True), ("tauri://localhost", (), True), ("vscode-webview://abc", (), True),
    ("https://evil.example", (), False), ("http://0.0.0.0.evil.example", (), False), ("null", (), False),
    ("https://app.example.com", ("https://app.example.com",), True),
    ("https://a.example.com", ("https://*.example.com",), True),
    ("https://example.com.evil", ("https://*.example.com",), False),
    ("https://anything", ("*",), True),
])
def test_allowed_origins_are_ollamas_defaults_and_the_operators(origin: str, extra: tuple[str, ...],
                                                                 allowed: bool) -> None:
    assert is_allowed_origin(origin, extra) is allowed


def test_error_texts_for_api_clients_name_no_server_path() -> None:
    assert without_paths("model 'x' not found (looked in /srv/models, /root/.ollama/models)") == (
        "model 'x' not found (looked in <path>, <path>)")
    assert without_paths("/api/pull is not served; see /v1/models") == "/api/pull is not served; see /v1/models"


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://127.0.0.1:11434", "127.0.0.1:11434", True), ("http://LocalHost:8080", "localhost:8080", True),
    ("http://fleet.lan", "fleet.lan:80", True), ("https://fleet.lan", "fleet.lan", True),
    ("http://evil.example", "127.0.0.1:11434", False), ("http://127.0.0.1:11435", "127.0.0.1:11434", False),
    ("https://fleet.lan", "fleet.lan:80", False), ("null", "127.0.0.1:11434", False),
    ("file://", "127.0.0.1", False), ("http://127.0.0.1:11434", None, False), ("http://x:bad", "x", False),
])
def test_same_origin_compares_host_and_port(origin: str, host: str | None, same: bool) -> None:
    assert is_same_origin(origin, host) is same


def _judge(credentials: HttpKeys, method: str, path: str, headers: dict[str, str],
           peer: tuple[str, int]) -> tuple[int, list[dict[str, Any]], bool]:
    """Status, the events recorded and whether the handler ran, for one request through the guard."""
    events: list[dict[str, Any]] = []
    ran = []

    def sink(kind: str, subject: str, message: str, **data: Any) -> None:
        events.append({"kind": kind, "subject": subject, "message": message} | data)

    async def handler(request: web.Request) -> web.StreamResponse:
        ran.append(True)
        return web.json_response({"ok": True})

    async def go() -> int:
        app = app_routes(credentials, sink)
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: peer if name == "peername" else default
        request = make_mocked_request(method, path, headers=headers, transport=transport, app=app)
        # What aiohttp's server does before the middlewares run: route the request.
        request._match_info = await app.router.resolve(request)  # noqa: SLF001 (no public setter)
        response = await guard(credentials, sink)(request, handler)
        return response.status

    return asyncio.run(go()), events, bool(ran)


LAN_PEER = ("10.0.0.5", 40000)
NO_ADMIN = HttpKeys(None, None, "0.0.0.0")


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/llamafleet/v1/nodes"), ("POST", "/llamafleet/v1/nodes"), ("DELETE", "/llamafleet/v1/nodes/a:1"),
    ("GET", "/metrics"), ("GET", "/llamafleet/v1/events/stream"), ("POST", "/llamafleet/v1/stop"),
])
def test_without_an_admin_key_a_lan_peer_is_refused_whatever_its_headers_say(method: str, path: str) -> None:
    headers = {"Host": "127.0.0.1:11434", "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1",
               "Forwarded": "for=127.0.0.1", "Content-Type": "application/json"}
    status, events, ran = _judge(NO_ADMIN, method, path, headers, LAN_PEER)
    assert (status, ran) == (401, False)
    assert [(e["kind"], e["peer"], e["reason"]) for e in events] == [("auth.refused", "10.0.0.5", "not loopback")]


def test_without_an_admin_key_a_lan_peer_still_reaches_the_public_and_open_inference_routes() -> None:
    for method, path in (("GET", "/llamafleet/v1/health"), ("GET", "/api/tags"), ("POST", "/v1/chat/completions")):
        status, events, ran = _judge(NO_ADMIN, method, path, {"Host": "10.0.0.2:11434"}, LAN_PEER)
        assert (status, ran, events) == (200, True, [])


def test_with_an_admin_key_a_lan_peer_needs_it_and_an_api_key_is_not_it() -> None:
    credentials = HttpKeys((API,), (ADMIN,), "0.0.0.0")
    headers = {"Host": "fleet.lan:11434", "Content-Type": "application/json"}
    for key, expected in ((None, 401), ("nope", 401), (API, 403), (ADMIN, 200)):
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        status, events, ran = _judge(credentials, "POST", "/llamafleet/v1/nodes", headers | auth, LAN_PEER)
        assert (status, ran) == (expected, expected == 200)
        assert all(ADMIN not in str(e) and API not in str(e) and "nope" not in str(e) for e in events)


def test_refusals_are_events_at_a_bounded_rate_per_peer() -> None:
    credentials = HttpKeys(None, (ADMIN,), "0.0.0.0")
    events: list[dict[str, Any]] = []

    async def go() -> None:
        app = app_routes(credentials, lambda *a, **k: None)
        check = guard(credentials, lambda kind, subject, message, **data: events.append(data))
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: LAN_PEER if name == "peername" else default
        for _ in range(100):
            request = make_mocked_request("GET", "/metrics", headers={"Host": "x"}, transport=transport, app=app)
            request._match_info = await app.router.resolve(request)  # noqa: SLF001
            assert (await check(request, lambda r: web.json_response({}))).status == 401

    asyncio.run(go())
    assert 1 <= len(events) <= 40  # every request refused, but not every one written down


@pytest.mark.parametrize(("path", "env", "sent"), [
    ("/llamafleet/v1/nodes", {"LLAMAFLEET_API_KEY": API, "LLAMAFLEET_ADMIN_KEY": ADMIN}, ADMIN),
    ("/api/chat", {"LLAMAFLEET_API_KEY": API, "LLAMAFLEET_ADMIN_KEY": ADMIN}, API),
    ("/v1/models", {"LLAMAFLEET_ADMIN_KEY": ADMIN}, ADMIN),  # an admin key opens the API too
    ("/llamafleet/v1/events?after=3", {"LLAMAFLEET_API_KEY": API}, None),  # never an API key to a control route
    ("/metrics", {"LLAMAFLEET_ADMIN_KEY": ADMIN}, ADMIN),
    ("/api/generate", {}, None),
])
def test_the_cli_sends_the_admin_key_to_control_routes_and_the_api_key_to_the_api(
        path: str, env: dict[str, str], sent: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMAFLEET_API_KEY", raising=False)
    monkeypatch.delenv("LLAMAFLEET_ADMIN_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert key_for(path) == sent
