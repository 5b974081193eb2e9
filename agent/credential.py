"""The agent's node credential: where it lives, how it changes, and the join that first gets it.

Sources, first found wins:

- `STATE/credential`: issued by the controller, at a join or a rotation;
- `--token-file`: installed by the operator (per node; or the fleet's shared token, deprecated);
- `STATE/token`: made by the agent at its first start when it is not to join (0600), for `llamafleet node add
  ADDR --credential-file` on the controller.

A rotation writes the new secret to `STATE/credential.next`; both are accepted until the
controller first uses the new one, which then replaces the old (so a lost answer to the rotation
never locks the controller out). A revocation records the secret's fingerprint in
`STATE/revoked` (a revoked `--token-file` secret stays refused across restarts) and removes
`STATE/credential`: the agent then accepts nothing until it joins again or is given a new file.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from llamafleet.agent.node import load_token
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.node_auth import fingerprint

log = logging.getLogger(__name__)
JOIN_PATH = "/llamafleet/v1/join"


class JoinRefused(LlamafleetError):
    """The controller refused the join token (unknown, expired, used up) or the node."""


def _write_private_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`, mode 0600, atomically (a crash leaves the old or the new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Keyring:
    """The secrets this agent accepts right now (normally one; two during a rotation)."""

    def __init__(self, state_dir: Path, token_file: Path | None, *, create: bool) -> None:
        self._state = state_dir
        self.issued = state_dir / "credential"
        self._next = state_dir / "credential.next"
        self._revoked_path = state_dir / "revoked"
        self._token_file = token_file
        self._create = create
        self.current: str | None = None
        self.pending: str | None = None
        self.source = ""
        self.load()

    def _revoked(self) -> set[str]:
        try:
            return set(self._revoked_path.read_text().split())
        except FileNotFoundError:
            return set()

    def load(self) -> None:
        revoked = self._revoked()
        self.current, self.source = None, ""
        candidates: list[tuple[Path, str]] = [(self.issued, "issued by the controller")]
        if self._token_file is not None:
            candidates.append((self._token_file, f"--token-file {self._token_file}"))
        for path, source in candidates:
            if path.exists():
                secret = load_token(path, create=False)
                if fingerprint(secret) in revoked:
                    log.warning("the credential in %s was revoked by the controller: not accepted", path)
                    continue
                self.current, self.source = secret, source
                break
        self.pending = self._next.read_text().strip() if self._next.exists() else None
        default = self._state / "token"
        if self.current is None and self._token_file is None and (self._create or default.exists()):
            if not default.exists():
                log.info("made a node credential in %s: give it to the controller with "
                         "`llamafleet node add ADDRESS --credential-file FILE`, or join with --join", default)
            secret = load_token(default, create=True)
            if fingerprint(secret) not in revoked:
                self.current, self.source = secret, f"{default} (made at first start)"

    def held(self) -> list[str]:
        return [s for s in (self.current, self.pending) if s]

    def adopt(self, secret: str) -> None:
        """A secret the controller issued (a join): it becomes the one credential."""
        _write_private_atomic(self.issued, secret + "\n")
        self._next.unlink(missing_ok=True)
        self.current, self.pending, self.source = secret, None, "issued by the controller"

    def stage(self, secret: str) -> None:
        """The first half of a rotation: accept `secret` beside the current one."""
        _write_private_atomic(self._next, secret + "\n")
        self.pending = secret

    def used(self, secret: str) -> None:
        """The controller called with `secret`: if it is the staged one, the rotation is complete."""
        if secret != self.pending or secret == self.current:
            return
        old = self.current
        os.replace(self._next, self.issued)
        self.current, self.pending, self.source = secret, None, "issued by the controller"
        if old:
            self._record_revoked(old)
        log.info("node credential rotated (new %s)", fingerprint(secret))

    def revoke(self, secret: str) -> None:
        """The controller removed this node: `secret` (and anything staged) stops working now."""
        self._record_revoked(secret)
        if self.pending:
            self._record_revoked(self.pending)
        self.issued.unlink(missing_ok=True)
        self._next.unlink(missing_ok=True)
        self.current = self.pending = None
        self.source = "revoked by the controller"
        log.warning("the controller removed this node: its credential is revoked; the agent accepts no "
                    "calls until it joins again (restart with --join) or is given a new credential")

    def _record_revoked(self, secret: str) -> None:
        revoked = self._revoked() | {fingerprint(secret)}
        _write_private_atomic(self._revoked_path, "\n".join(sorted(revoked)) + "\n")


def join(controller: str, join_token: str, address: str, node_id: str, hostname: str,
         timeout_s: float = 10.0) -> str:
    """Ask the controller to admit this node; returns the node's secret.

    Raises JoinRefused when the controller says no (retrying will not help), and
    LlamafleetError when it cannot be reached (retrying may).
    """
    body = json.dumps({"token": join_token, "address": address, "node_id": node_id,
                       "hostname": hostname}).encode()
    request = urllib.request.Request(controller.rstrip("/") + JOIN_PATH, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            answer = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (json.JSONDecodeError, AttributeError):
            # Not the controller's JSON error shape (a proxy?): the HTTP reason is all there is.
            message = exc.reason
        kind = JoinRefused if exc.code in (400, 403, 409) else LlamafleetError
        raise kind(f"controller {controller} refused the join: {message}") from None
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
        raise LlamafleetError(f"cannot reach controller {controller} to join: {getattr(exc, 'reason', exc)}") from None
    secret = answer.get("credential") if isinstance(answer, dict) else None
    if not isinstance(secret, str) or not secret:
        raise LlamafleetError(f"controller {controller} answered the join without a credential")
    return secret
