"""HMAC proofs of a node secret: what a captured proof can and cannot be used for."""

from __future__ import annotations

import pytest

from llamafleet.common.node_auth import ProofChecker, ProofError, make_proof, new_secret

WATCH = "/llamafleet.v1.AgentService/WatchStatus"
BUILD = "/llamafleet.v1.AgentService/Build"


def test_a_proof_is_accepted_once_and_names_the_secret_it_was_made_with() -> None:
    secret, other = new_secret(), new_secret()
    proof = make_proof(secret, WATCH)
    checker = ProofChecker()
    assert secret not in proof
    assert checker.verify(proof, WATCH, [other, secret]).secret == secret
    with pytest.raises(ProofError, match="replayed"):
        checker.verify(proof, WATCH, [secret])


def test_a_captured_proof_is_useless_for_another_method_or_another_node() -> None:
    secret = new_secret()
    proof = make_proof(secret, WATCH)
    with pytest.raises(ProofError, match="wrong credential"):
        ProofChecker().verify(proof, BUILD, [secret])
    with pytest.raises(ProofError, match="wrong credential"):
        ProofChecker().verify(proof, WATCH, [new_secret()])


def test_a_stale_proof_is_refused() -> None:
    secret = new_secret()
    proof = make_proof(secret, WATCH, now=1_000_000.0)
    with pytest.raises(ProofError, match="stale"):
        ProofChecker().verify(proof, WATCH, [secret], now=1_000_000.0 + 600)


@pytest.mark.parametrize("presented", ["", "Bearer x", "LF1-HMAC-SHA256 a.b.c.d.e", "LF1-HMAC-SHA256 1.2.3",
                                       "LF1-HMAC-SHA256 " + "1." + "0" * 32 + ".steal.-." + "0" * 64,
                                       # digits that are not ASCII, and a timestamp no clock has
                                       "LF1-HMAC-SHA256 " + "²." + "0" * 32 + ".none.-." + "0" * 64,
                                       "LF1-HMAC-SHA256 " + "9" * 400 + "." + "0" * 32 + ".none.-." + "0" * 64])
def test_malformed_proofs_are_refused(presented: str) -> None:
    with pytest.raises(ProofError):
        ProofChecker().verify(presented, WATCH, [new_secret()])


def test_a_rotation_carries_the_new_secret_sealed() -> None:
    old, new = new_secret(), new_secret()
    proof = make_proof(old, WATCH, "rotate", new)
    assert new not in proof and old not in proof
    verified = ProofChecker().verify(proof, WATCH, [old])
    assert verified.action == "rotate" and verified.new_secret == new


def test_a_tampered_rotation_is_refused() -> None:
    old = new_secret()
    scheme, rest = make_proof(old, WATCH, "rotate", new_secret()).split(" ")
    ts, nonce, action, payload, sig = rest.split(".")
    flipped = format(int(payload[:2], 16) ^ 1, "02x") + payload[2:]
    with pytest.raises(ProofError, match="wrong credential"):
        ProofChecker().verify(f"{scheme} {ts}.{nonce}.{action}.{flipped}.{sig}", WATCH, [old])
    with pytest.raises(ProofError, match="wrong credential"):
        ProofChecker().verify(f"{scheme} {ts}.{nonce}.revoke.{payload}.{sig}", WATCH, [old])
