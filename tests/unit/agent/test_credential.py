"""The agent's keyring on disk: sources, rotation in two steps, revocation that survives a restart."""

from __future__ import annotations

import stat
from pathlib import Path

from llamafleet.agent.credential import Keyring


def test_without_a_file_the_agent_makes_its_own_private_credential(tmp_path: Path) -> None:
    ring = Keyring(tmp_path, None, create=True)
    made = (tmp_path / "token").read_text().strip()
    assert ring.held() == [made] and stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert Keyring(tmp_path, None, create=True).current == made


def test_a_node_that_is_to_join_holds_nothing_until_it_has(tmp_path: Path) -> None:
    ring = Keyring(tmp_path, None, create=False)
    assert ring.held() == [] and not (tmp_path / "token").exists()
    ring.adopt("issued-secret")
    assert Keyring(tmp_path, None, create=False).held() == ["issued-secret"]
    assert stat.S_IMODE((tmp_path / "credential").stat().st_mode) == 0o600


def test_a_rotation_accepts_both_until_the_new_one_is_used(tmp_path: Path) -> None:
    installed = tmp_path / "installed.token"
    installed.write_text("old-secret\n")
    ring = Keyring(tmp_path / "state", installed, create=True)
    ring.stage("new-secret")
    assert ring.held() == ["old-secret", "new-secret"]
    ring.used("old-secret")  # the controller's answer was lost: the old one still works
    assert ring.held() == ["old-secret", "new-secret"]
    ring.used("new-secret")
    assert ring.held() == ["new-secret"]
    # The issued credential outranks the installed file, which stays refused after a restart.
    assert Keyring(tmp_path / "state", installed, create=True).held() == ["new-secret"]


def test_a_revoked_credential_stays_refused_after_a_restart(tmp_path: Path) -> None:
    installed = tmp_path / "installed.token"
    installed.write_text("secret\n")
    ring = Keyring(tmp_path / "state", installed, create=True)
    ring.revoke("secret")
    assert ring.held() == []
    assert Keyring(tmp_path / "state", installed, create=True).held() == []
    assert "secret" not in (tmp_path / "state" / "revoked").read_text()
