"""Join tokens and per-node secrets in the controller's store."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamafleet.common.errors import UsageError
from llamafleet.controller.credentials import CredentialConflict, Credentials, JoinRefused
from llamafleet.controller.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def book(tmp_path: Path, shared: str | None = None) -> tuple[Credentials, Clock, Store]:
    clock = Clock()
    store = Store(tmp_path / "c.sqlite3")
    return Credentials(store, shared, clock=clock), clock, store


def test_a_join_token_admits_one_node_with_a_secret_of_its_own(tmp_path: Path) -> None:
    credentials, _, store = book(tmp_path)
    token, _ = credentials.create_join_token(3600, 1)
    secret = credentials.admit(token, "10.0.0.5:50051", "node-a")
    target = credentials.target("10.0.0.5:50051")
    assert target.token == secret and target.proof and store.nodes() == [("10.0.0.5:50051", False)]
    with pytest.raises(JoinRefused, match="already used"):
        credentials.admit(token, "10.0.0.6:50051", "node-b")
    assert token not in (tmp_path / "c.sqlite3").read_bytes().decode(errors="replace")


def test_expired_and_unknown_tokens_are_refused_clearly(tmp_path: Path) -> None:
    credentials, clock, _ = book(tmp_path)
    token, _ = credentials.create_join_token(60, 5)
    clock.now += 61
    with pytest.raises(JoinRefused, match="expired at"):
        credentials.admit(token, "10.0.0.5:50051", "")
    with pytest.raises(JoinRefused, match="unknown join token"):
        credentials.admit("lfjoin_guess", "10.0.0.5:50051", "")
    with pytest.raises(UsageError):
        credentials.create_join_token(0, 1)


def test_a_token_holder_cannot_take_over_a_node_with_a_credential(tmp_path: Path) -> None:
    credentials, _, _ = book(tmp_path)
    token, _ = credentials.create_join_token(3600, 2)
    first = credentials.admit(token, "10.0.0.5:50051", "a")
    with pytest.raises(CredentialConflict):
        credentials.admit(token, "10.0.0.5:50051", "attacker")
    assert credentials.target("10.0.0.5:50051").token == first


def test_a_token_holder_cannot_take_over_a_node_on_the_shared_token_or_without_a_credential(tmp_path: Path) -> None:
    credentials, _, store = book(tmp_path, shared="fleet-token")
    store.add_node("10.0.0.7:50051")  # added with --agent or `node add`, no credential of its own
    token, _ = credentials.create_join_token(3600, 1)
    with pytest.raises(CredentialConflict, match="already a node"):
        credentials.admit(token, "10.0.0.7:50051", "attacker")
    # Refused before the token was spent, and the node still gets what it got before.
    assert credentials.target("10.0.0.7:50051").metadata_for("/x/Y") == [("authorization", "Bearer fleet-token")]
    assert credentials.admit(token, "10.0.0.8:50051", "honest")


def test_a_node_without_a_credential_is_sent_nothing_unless_the_shared_token_is_configured(tmp_path: Path) -> None:
    credentials, _, _ = book(tmp_path)
    bare = credentials.target("10.0.0.9:50051")
    assert bare.token == "" and bare.metadata_for("/x/Y") == [] and "no credential" in bare.missing
    shared, _, _ = book(tmp_path / "legacy", shared="fleet-token")
    assert shared.target("10.0.0.9:50051").metadata_for("/x/Y") == [("authorization", "Bearer fleet-token")]
    shared.install("10.0.0.5:50051", "own-secret")
    own = shared.target("10.0.0.5:50051").metadata_for("/x/Y")[0][1]
    assert own.startswith("LF1-HMAC-SHA256 ") and "own-secret" not in own
