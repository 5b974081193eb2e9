"""HTTP routes for node credentials: the public join, and the admin's tokens and rotation.

`POST /llamafleet/v1/join` is reached by an agent that holds nothing but a join token: that
token is its credential, checked here, so any admin-credential middleware must let this one
route through. `POST /llamafleet/v1/tokens` and `POST /llamafleet/v1/nodes/{address}/rotate` are
control actions like the rest of `/llamafleet/v1/`.
"""

from __future__ import annotations

import logging

from aiohttp import web

from llamafleet.common.errors import UsageError
from llamafleet.controller.credentials import AgentUnreachable, CredentialConflict, Credentials, JoinRefused
from llamafleet.controller.inventory import Inventory, validate_address
from llamafleet.controller.web import error, json_body, string_field

log = logging.getLogger(__name__)
PREFIX = "/llamafleet/v1"
JOIN_ROUTE = ("POST", f"{PREFIX}/join")
MAX_BODY_BYTES = 16 * 1024
MAX_NODE_ID_CHARS = 128


def _number(body: dict[str, object], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"'{key}' must be a number")
    return float(value)


def join_routes(credentials: Credentials, inventory: Inventory) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.post(JOIN_ROUTE[1])
    async def join(request: web.Request) -> web.Response:
        body = await json_body(request, MAX_BODY_BYTES)
        token = string_field(body, "token")
        address = validate_address(string_field(body, "address"))
        node_id = body.get("node_id", "")
        if not isinstance(node_id, str) or len(node_id) > MAX_NODE_ID_CHARS:
            raise UsageError(f"'node_id' must be a string of at most {MAX_NODE_ID_CHARS} characters")
        try:
            secret = credentials.admit(token, address, node_id)
        except JoinRefused as exc:
            # Never log the token presented: a near-miss is still a secret.
            log.warning("refused a join as %s from %s: %s", address, request.remote, exc.message)
            return error(403, exc.message)
        except CredentialConflict as exc:
            log.warning("refused a join as %s from %s: %s", address, request.remote, exc.message)
            return error(409, exc.message)
        if not inventory.add(address):
            # Added before without a credential: dial again, now with one.
            await inventory.redial(address)
        return web.json_response({"address": address, "credential": secret}, status=201)

    @routes.post(f"{PREFIX}/tokens")
    async def create_token(request: web.Request) -> web.Response:
        body = await json_body(request, MAX_BODY_BYTES)
        ttl_s = _number(body, "ttl_s", 3600.0)
        uses = body.get("uses", 1)
        if isinstance(uses, bool) or not isinstance(uses, int):
            raise UsageError("'uses' must be an integer")
        token, expires = credentials.create_join_token(ttl_s, uses)
        return web.json_response({"token": token, "expires_at_unix_ms": expires, "uses": uses}, status=201)

    @routes.post(PREFIX + "/nodes/{address}/rotate")
    async def rotate(request: web.Request) -> web.Response:
        address = request.match_info["address"]
        if inventory.record(address) is None:
            return error(404, f"no node {address}")
        try:
            name, confirmed = await credentials.rotate(address)
        except AgentUnreachable as exc:
            return error(502, f"credential not rotated: {exc.message}")
        return web.json_response({"address": address, "credential_fingerprint": name, "confirmed": confirmed})

    return routes
