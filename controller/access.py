"""Who may call which route of the controller: the one place that classifies routes.

Three kinds of route, by the route's template (`/llamafleet/v1/nodes/{address}`), never by the
text of the request path:

- **public**: liveness (`GET /`, `GET /api/version`, `GET /llamafleet/v1/health`) and the
  dashboard's static files. Declare a new public route in `PUBLIC_ROUTES`, nowhere else.
- **inference**: the Ollama and OpenAI APIs (`/api/...`, `/v1/...`): an API key
  (`--api-key-file`) or an admin key, when API keys are configured; open otherwise.
- **admin**: everything else (the control routes under `/llamafleet/v1/`, `/metrics`, and any
  route not declared above: a new route is admin until someone decides otherwise). An admin key
  (`--admin-key-file`); without one configured, only a client on loopback, whose request is
  addressed to a loopback name (DNS rebinding).

Nothing here imports aiohttp: the CLI uses `is_inference_path` to pick the key it sends.
"""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import urllib.parse

# Reachable with no credential at all: (method, route template). HEAD is judged as GET.
PUBLIC_ROUTES = frozenset({
    ("GET", "/"), ("GET", "/api/version"), ("GET", "/llamafleet/v1/health"),
    # An agent's join: its join token is its credential (controller/join.py checks it).
    ("POST", "/llamafleet/v1/join"),
    # The dashboard's own files hold no data: it asks for a key before it reads any.
    ("GET", "/ui"), ("GET", "/ui/"), ("GET", "/ui/{name}"),
})
INFERENCE_PREFIXES = ("/api/", "/v1/")
# Methods a browser's page may send cross-origin without asking (no preflight) and that change
# nothing on our control routes; everything else must be JSON, which a plain form cannot send.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class Access(enum.Enum):
    PUBLIC = "public"
    INFERENCE = "inference"
    ADMIN = "admin"


def route_access(method: str, template: str) -> Access:
    """The credential a route needs. `template` is the matched route's canonical path."""
    if ("GET" if method == "HEAD" else method, template) in PUBLIC_ROUTES:
        return Access.PUBLIC
    if is_inference_path(template):
        return Access.INFERENCE
    return Access.ADMIN


def is_inference_path(path: str) -> bool:
    """Whether `path` (a query string allowed) belongs to the Ollama/OpenAI APIs."""
    return urllib.parse.urlsplit(path).path.startswith(INFERENCE_PREFIXES)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is no part of it
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 is how a dual-stack socket shows an IPv4 peer.
        return address.ipv4_mapped
    return address


def is_loopback_peer(peer: str | None) -> bool:
    """Whether the socket's peer address is on this host's loopback (127.0.0.0/8 or ::1).

    Only the address the connection came from counts, never a header (X-Forwarded-For): anyone
    can write a header.
    """
    address = _ip(peer) if peer else None
    return address is not None and address.is_loopback


def _host_and_port(host_header: str) -> tuple[str, int | None] | None:
    """`Host: [::1]:11434` → ("::1", 11434); None when it is not a host[:port]."""
    try:
        parts = urllib.parse.urlsplit("//" + host_header)
        hostname, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not hostname or parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return hostname.rstrip("."), port


def is_loopback_host(host_header: str | None, listen_host: str) -> bool:
    """Whether a request was addressed to this host by a loopback name or address.

    A web page whose own name an attacker points at 127.0.0.1 (DNS rebinding) reaches a loopback
    controller from the user's browser, but its requests carry the attacker's name in `Host`.
    """
    parsed = _host_and_port(host_header) if host_header else None
    if parsed is None:
        return False
    hostname = parsed[0]
    if hostname == "localhost":
        return True
    address = _ip(hostname)
    if address is not None and address.is_loopback:
        return True
    listen = listen_host.strip("[]").lower()
    return hostname == listen and listen not in ("", "0.0.0.0", "::")


def is_loopback_origin(origin: str) -> bool:
    """Whether a browser's `Origin` is a page served from this host (`http://localhost:3000`):
    what Ollama lets call its API from a browser without OLLAMA_ORIGINS."""
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    address = _ip(parts.hostname)
    return address is not None and address.is_loopback


# What Ollama lets call its API from a browser without OLLAMA_ORIGINS, besides pages on this host:
# desktop and editor apps' webviews.
APP_ORIGINS = ("app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*")


def is_allowed_origin(origin: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether a page of `origin` may call the Ollama/OpenAI routes, as OLLAMA_ORIGINS decides:
    pages on this host (localhost, loopback, 0.0.0.0, any port), app webviews, and the
    operator's `--origins` patterns (`https://app.example.com`, `http://*.lan:*`, `*`)."""
    lowered = origin.lower()
    if is_loopback_origin(origin) or (lowered.startswith(("http://", "https://")) and _hostname(origin) == "0.0.0.0"):
        return True
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in (*APP_ORIGINS, *extra))


def _hostname(url: str) -> str | None:
    try:
        return urllib.parse.urlsplit(url).hostname
    except ValueError:
        return None


def is_same_origin(origin: str, host_header: str | None) -> bool:
    """Whether a browser's `Origin` names the host and port the request was sent to (`Host`)."""
    try:
        parts = urllib.parse.urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (a sandboxed frame, a file:// page) or something stranger
    host = _host_and_port(host_header) if host_header else None
    if host is None:
        return False
    default = 443 if parts.scheme == "https" else 80
    return (parts.hostname.rstrip("."), origin_port or default) == (host[0], host[1] or default)
