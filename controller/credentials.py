"""Per-node credentials on the controller: join tokens, each node's own secret, rotation, revocation.

The rule: the controller never sends a credential to an endpoint whose identity it has not
pinned. A node's secret is made for that node (at its join, or installed by the admin with
`node add --credential-file`) and only an HMAC proof of it goes on the wire, so what one node (or
something posing as it) sees is useless against any other. A node with no credential of its own
is sent nothing at all, unless the deprecated fleet-wide token is configured.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc

from llamafleet.common.agent_client import AgentAddress, aio_channel, describe_rpc_error
from llamafleet.common.errors import LlamafleetError, UsageError
from llamafleet.common.node_auth import fingerprint, new_secret
from llamafleet.controller.store import Store
from llamafleet.proto.v1 import agent_pb2 as pb
from llamafleet.proto.v1 import agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"].full_name


def method_path(name: str) -> str:
    """The full gRPC path of an AgentService method: what a per-call proof is bound to."""
    return f"/{SERVICE}/{name}"


STATUS_METHOD = method_path("GetStatus")
WATCH_METHOD = method_path("WatchStatus")
STAGE_METHOD = method_path("StageTensors")
CALL_TIMEOUT_S = 10.0
MAX_JOIN_TTL_S = 7 * 24 * 3600.0
MAX_SECRET_CHARS = 64  # what a rotation can seal; agents make 43-character ones
JOIN_TOKEN_PREFIX = "lfjoin_"
NO_CREDENTIAL = ("no credential for this node: let its agent join (`llamafleet token create`, then "
                 "`llamafleet-agent serve --join URL --join-token-file FILE`) or add it with "
                 "`llamafleet node add ADDRESS --credential-file FILE`")


class JoinRefused(LlamafleetError):
    """An unknown, expired or used-up join token (HTTP 403)."""


class CredentialConflict(LlamafleetError):
    """The address already belongs to a node with a credential (HTTP 409)."""


class AgentUnreachable(LlamafleetError):
    """The agent did not answer a credential change (HTTP 502)."""


@dataclass(frozen=True)
class Tls:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def ssl_context(self) -> ssl.SSLContext | bool:
        """The same pinning for HTTPS (the agents' coordinator proxies) as gRPC gets: the agents'
        CA, and this controller's client certificate for their mTLS. True (the system's trust)
        without a CA: the agents then use no TLS, serve plain HTTP, and this is never used."""
        if self.ca is None:
            return True
        try:
            context = ssl.create_default_context(cafile=self.ca)
            if self.cert and self.key:
                context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot use the agents' TLS files ({self.ca}, {self.cert}, {self.key}): {exc}") from None
        return context


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_secret(secret: str) -> str:
    secret = secret.strip()
    if not secret or len(secret) > MAX_SECRET_CHARS or not secret.isprintable() or " " in secret:
        raise UsageError(f"a node credential is 1..{MAX_SECRET_CHARS} printable characters without spaces")
    return secret


class Credentials:
    def __init__(self, store: Store, shared_token: str | None = None, tls: Tls = Tls(),
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._shared = shared_token
        self._tls = tls
        self._clock = clock
        # One credential change per node at a time: two rotations whose answers cross would
        # leave the agent and the store holding different secrets.
        self._changing: dict[str, asyncio.Lock] = {}

    # ---- dialing ------------------------------------------------------------------------------

    def target(self, address: str) -> AgentAddress:
        """How to reach `address`: its own secret as proofs, else the shared token, else nothing."""
        tls = (self._tls.ca, self._tls.cert, self._tls.key)
        own = self._store.credential(address)
        if own is not None:
            return AgentAddress(address, own[0], *tls, proof=True)
        if self._shared:
            return AgentAddress(address, self._shared, *tls)
        return AgentAddress(address, "", *tls, missing=NO_CREDENTIAL)

    def has_own(self, address: str) -> bool:
        return self._store.credential(address) is not None

    # ---- joining ------------------------------------------------------------------------------

    def create_join_token(self, ttl_s: float, uses: int) -> tuple[str, int]:
        if not 0 < ttl_s <= MAX_JOIN_TTL_S:
            raise UsageError(f"a join token lives more than 0 s and at most {MAX_JOIN_TTL_S / 86400:.0f} days")
        if not 1 <= uses <= 1000:
            raise UsageError("a join token is good for 1..1000 joins")
        token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(24)
        expires = int((self._clock() + ttl_s) * 1000)
        self._store.add_join_token(_token_hash(token), expires, uses)
        log.info("join token created (expires %s, %d use(s))", _when(expires), uses)
        return token, expires

    def admit(self, token: str, address: str, node_id: str) -> str:
        """Check a join token and make the node's secret; raises JoinRefused or CredentialConflict."""
        digest = _token_hash(token)
        found = self._store.join_token(digest)
        now = int(self._clock() * 1000)
        if found is None:
            raise JoinRefused("unknown join token")
        expires, uses_left = found
        if expires <= now:
            raise JoinRefused(f"join token expired at {_when(expires)}")
        if uses_left <= 0:
            raise JoinRefused("join token already used")
        if self.has_own(address) or any(known == address for known, _ in self._store.nodes()):
            # A token holder must not take over a node the fleet already has, with a credential
            # or without one (a shared-token or credential-less node): the controller would
            # then speak to that address with the joiner's secret, and the real agent be out.
            raise CredentialConflict(f"{address} is already a node: remove it first "
                                     "(`llamafleet node remove`) to join it again")
        secret = new_secret()
        if not self._store.admit(digest, now, address, secret, node_id):
            raise JoinRefused("join token expired or already used")
        log.info("node %s (id %s) joined with a join token; credential %s", address, node_id, fingerprint(secret))
        return secret

    def install(self, address: str, secret: str) -> None:
        """The admin's `node add --credential-file`: the agent's own credential, for this address only."""
        self._store.set_credential(address, check_secret(secret), "admin")

    # ---- changing -----------------------------------------------------------------------------

    async def rotate(self, address: str) -> tuple[str, bool]:
        """Give the node a new secret; returns its fingerprint and whether the agent confirmed it.

        Staged under the current credential (which must work), then completed by the first call
        with the new one: from then on the old one is refused. A node on the shared token moves
        to a credential of its own this way.
        """
        async with self._changing.setdefault(address, asyncio.Lock()):
            return await self._rotate(address)

    async def _rotate(self, address: str) -> tuple[str, bool]:
        current = self.target(address)
        if not current.token:
            raise UsageError(f"{address} has no credential to rotate from: {NO_CREDENTIAL}")
        fresh = new_secret()
        await self._status(replace(current, proof=True), "rotate", fresh)
        self._store.set_credential(address, fresh, "rotated")
        log.info("node %s: credential rotated to %s", address, fingerprint(fresh))
        try:
            await self._status(self.target(address))
        except AgentUnreachable as exc:
            # The agent accepts both until it sees the new one: the next dial completes it.
            log.warning("node %s: new credential not yet confirmed: %s", address, exc.message)
            return fingerprint(fresh), False
        return fingerprint(fresh), True

    async def revoke(self, address: str) -> tuple[bool, str]:
        """Tell the agent its credential stops working (before the node is removed).

        Returns (told, why not). The shared token is never revoked this way: it is every node's.
        """
        async with self._changing.setdefault(address, asyncio.Lock()):
            return await self._revoke(address)

    async def _revoke(self, address: str) -> tuple[bool, str]:
        target = self.target(address)
        if not target.proof:
            return False, "the node has no credential of its own (shared token or none): nothing to revoke"
        try:
            await self._status(target, "revoke")
        except AgentUnreachable as exc:
            return False, exc.message
        return True, ""

    async def _status(self, target: AgentAddress, action: str = "none", new: str = "") -> None:
        channel = aio_channel(target)
        try:
            stub = pb_grpc.AgentServiceStub(channel)
            await stub.GetStatus(pb.GetStatusRequest(), metadata=target.metadata_for(STATUS_METHOD, action, new),
                                 timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise AgentUnreachable(describe_rpc_error(target.address, exc).message) from None
        finally:
            await channel.close()


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

