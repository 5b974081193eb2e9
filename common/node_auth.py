"""Per-node credentials on the wire: a proof of the secret, never the secret itself.

The controller holds one secret per node and sends, on every call, an HMAC-SHA256 over the gRPC
method, a timestamp and a fresh nonce (and, for credential changes, the action and its sealed
payload). An endpoint that captures a proof learns nothing it can reuse: the agent refuses a
proof older than `MAX_SKEW_S`, one it has seen before, and one made for another method. A proof
made with node X's secret is worthless at node Y, which holds a different secret.

    authorization: LF1-HMAC-SHA256 <unix ms>.<nonce hex>.<action>.<payload hex or ->.<sig hex>

Actions ride on an ordinary authenticated call (`GetStatus`), so the wire contract needs no new
RPC: `rotate` carries a new secret sealed under the current one (XOR with an HMAC-SHA512
keystream bound to the nonce, the whole covered by the signature); `revoke` tells the agent to
forget the secret it was called with.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

SCHEME = "LF1-HMAC-SHA256"
ACTIONS = ("none", "rotate", "revoke")
# Clocks of controller and agent may differ by this much (NTP keeps real fleets far closer).
MAX_SKEW_S = 120.0
# Sealed secrets are XORed with one HMAC-SHA512 block.
MAX_SEALED_BYTES = 64


class ProofError(ValueError):
    """A presented proof is malformed, stale, replayed or wrong (the message says which)."""


def new_secret() -> str:
    """A node secret: 256 random bits, URL-safe text (43 characters)."""
    return secrets.token_urlsafe(32)


def fingerprint(secret: str) -> str:
    """What may be stored or logged about a secret: a short, one-way name for it."""
    return hashlib.sha256(b"llamafleet-credential\n" + secret.encode()).hexdigest()[:16]


def coordinator_key(secret: str, coordinator_id: str) -> str:
    """The key of one coordinator a node runs (StartCoordinator): both ends derive it from the
    node's secret, so it is never sent to the agent; what it opens is that coordinator only, for
    as long as it runs (a new start has a new id)."""
    return hmac.new(secret.encode(), b"llamafleet-coordinator\n" + coordinator_id.encode(), hashlib.sha256).hexdigest()


def _keystream(secret: str, nonce: str) -> bytes:
    return hmac.new(secret.encode(), b"llamafleet-seal\n" + nonce.encode(), hashlib.sha512).digest()


def _sign(secret: str, method: str, ts: str, nonce: str, action: str, payload: str) -> str:
    message = "\n".join((SCHEME, method, ts, nonce, action, payload)).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def make_proof(secret: str, method: str, action: str = "none", new_secret_value: str = "",
               now: float | None = None) -> str:
    """The `authorization` value for one call of `method` (e.g. /llamafleet.v1.AgentService/WatchStatus)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    ts = str(int((time.time() if now is None else now) * 1000))
    nonce = secrets.token_hex(16)
    payload = "-"
    if action == "rotate":
        raw = new_secret_value.encode()
        if not raw or len(raw) > MAX_SEALED_BYTES:
            raise ValueError("a rotated secret must be 1..64 bytes")
        payload = bytes(a ^ b for a, b in zip(raw, _keystream(secret, nonce))).hex()
    return f"{SCHEME} {ts}.{nonce}.{action}.{payload}.{_sign(secret, method, ts, nonce, action, payload)}"


@dataclass(frozen=True)
class Verified:
    secret: str  # which of the held secrets the proof was made with
    action: str
    new_secret: str  # for `rotate`: the unsealed new secret


class ProofChecker:
    """The agent's side: checks proofs against the secrets it holds, and remembers nonces."""

    def __init__(self, max_skew_s: float = MAX_SKEW_S, max_nonces: int = 100_000) -> None:
        self._max_skew_s = max_skew_s
        self._max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce → when it expires (time.time)

    def verify(self, presented: str, method: str, held: list[str], now: float | None = None) -> Verified:
        now = time.time() if now is None else now
        scheme, _, rest = presented.partition(" ")
        parts = rest.split(".")
        if scheme != SCHEME or len(parts) != 5:
            raise ProofError("malformed proof")
        ts, nonce, action, payload, sig = parts
        # ASCII digits only, and few ("²".isdigit() is true, and int() of it raises).
        if not (ts.isascii() and ts.isdigit() and len(ts) <= 16) or len(nonce) != 32 or action not in ACTIONS:
            raise ProofError("malformed proof")
        if abs(now - int(ts) / 1000) > self._max_skew_s:
            raise ProofError(f"stale proof (clocks more than {self._max_skew_s:.0f} s apart?)")
        # Compare against every held secret (current and a pending rotation), in constant time.
        matches = [s for s in held if hmac.compare_digest(_sign(s, method, ts, nonce, action, payload), sig)]
        if not matches:
            raise ProofError("wrong credential")
        self._forget_expired(now)
        if nonce in self._seen:
            raise ProofError("replayed proof")
        if len(self._seen) >= self._max_nonces:
            # Only valid proofs get here, so this means a flood from the controller itself.
            raise ProofError("too many calls within the replay window")
        self._seen[nonce] = now + 2 * self._max_skew_s
        secret = matches[0]
        new = ""
        if action == "rotate":
            try:
                sealed = bytes.fromhex(payload)
            except ValueError:
                raise ProofError("malformed rotation payload") from None
            if not sealed or len(sealed) > MAX_SEALED_BYTES:
                raise ProofError("malformed rotation payload")
            try:
                new = bytes(a ^ b for a, b in zip(sealed, _keystream(secret, nonce))).decode()
            except UnicodeDecodeError:
                raise ProofError("malformed rotation payload") from None
        return Verified(secret, action, new)

    def _forget_expired(self, now: float) -> None:
        while self._seen:
            nonce, expires = next(iter(self._seen.items()))
            if expires > now:
                return
            del self._seen[nonce]
