"""The controller's durable state: SQLite in WAL mode, every change one transaction."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from llamafleet.common.errors import LlamafleetError

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    address     TEXT PRIMARY KEY,
    maintenance INTEGER NOT NULL DEFAULT 0,
    added_at_ms INTEGER NOT NULL
);
-- One secret per node: the controller proves it to that node alone (common/node_auth.py). It is
-- kept in the clear because an HMAC needs it; the database is the controller's own (0600).
CREATE TABLE IF NOT EXISTS node_credentials (
    address     TEXT PRIMARY KEY,
    secret      TEXT NOT NULL,
    node_id     TEXT NOT NULL DEFAULT '',
    source      TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
-- Join tokens are stored as their SHA-256 only: 192 random bits need no slow hash.
CREATE TABLE IF NOT EXISTS join_tokens (
    token_sha256  TEXT PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL,
    uses_left     INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS placements (
    model       TEXT PRIMARY KEY,
    plan_json   TEXT NOT NULL,
    placed_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms       INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    message     TEXT NOT NULL,
    data_json   TEXT NOT NULL
);
"""


class StateNotWritable(LlamafleetError):
    """The controller's state dir refuses a write (full, read-only): said as the cause, with a 503."""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection, used from the event loop's thread only.
        if not path.exists():
            # Node secrets live here: readable by the controller alone, from the first byte.
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            # A database made before it held secrets may be world-readable: no longer.
            os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _tx(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._db:  # BEGIN … COMMIT, or ROLLBACK on error
            self._db.execute("BEGIN IMMEDIATE")
            return self._db.execute(sql, args).rowcount

    def add_node(self, address: str) -> bool:
        """True when the node is new."""
        return self._tx("INSERT OR IGNORE INTO nodes(address, added_at_ms) VALUES (?, ?)",
                        (address, int(time.time() * 1000))) == 1

    def remove_node(self, address: str) -> bool:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM node_credentials WHERE address = ?", (address,))
            return self._db.execute("DELETE FROM nodes WHERE address = ?", (address,)).rowcount == 1

    # ---- credentials ----------------------------------------------------------------------------

    def set_credential(self, address: str, secret: str, source: str, node_id: str = "") -> None:
        self._tx("INSERT OR REPLACE INTO node_credentials(address, secret, node_id, source, updated_at_ms) "
                 "VALUES (?, ?, ?, ?, ?)", (address, secret, node_id, source, int(time.time() * 1000)))

    def credential(self, address: str) -> tuple[str, str, str] | None:
        """(secret, source, node_id) of a node, or None when it has none."""
        row = self._db.execute("SELECT secret, source, node_id FROM node_credentials WHERE address = ?",
                               (address,)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def add_join_token(self, token_sha256: str, expires_at_ms: int, uses: int) -> None:
        self._tx("INSERT INTO join_tokens(token_sha256, expires_at_ms, uses_left, created_at_ms) VALUES (?, ?, ?, ?)",
                 (token_sha256, expires_at_ms, uses, int(time.time() * 1000)))

    def join_token(self, token_sha256: str) -> tuple[int, int] | None:
        """(expires_at_ms, uses_left) of a join token, or None when unknown."""
        row = self._db.execute("SELECT expires_at_ms, uses_left FROM join_tokens WHERE token_sha256 = ?",
                               (token_sha256,)).fetchone()
        return (row[0], row[1]) if row else None

    def admit(self, token_sha256: str, now_ms: int, address: str, secret: str, node_id: str) -> bool:
        """Spend one use of a live join token and add the node with its secret, in one transaction.

        False when the token is unknown, expired or used up (nothing changes then).
        """
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            spent = self._db.execute("UPDATE join_tokens SET uses_left = uses_left - 1 WHERE token_sha256 = ? "
                                     "AND expires_at_ms > ? AND uses_left > 0", (token_sha256, now_ms)).rowcount
            if spent != 1:
                return False
            self._db.execute("INSERT OR IGNORE INTO nodes(address, added_at_ms) VALUES (?, ?)", (address, now_ms))
            self._db.execute("INSERT OR REPLACE INTO node_credentials(address, secret, node_id, source, updated_at_ms) "
                             "VALUES (?, ?, ?, 'joined', ?)", (address, secret, node_id, now_ms))
            # Spent and expired tokens are kept a day, so a late join hears why it was refused.
            self._db.execute("DELETE FROM join_tokens WHERE expires_at_ms <= ?", (now_ms - 86_400_000,))
            return True

    def set_maintenance(self, address: str, enabled: bool) -> bool:
        return self._tx("UPDATE nodes SET maintenance = ? WHERE address = ?", (int(enabled), address)) == 1

    def nodes(self) -> list[tuple[str, bool]]:
        rows = self._db.execute("SELECT address, maintenance FROM nodes ORDER BY address").fetchall()
        return [(address, bool(maintenance)) for address, maintenance in rows]

    def save_placement(self, model: str, plan: dict[str, Any]) -> None:
        self._tx("INSERT OR REPLACE INTO placements(model, plan_json, placed_at_ms) VALUES (?, ?, ?)",
                 (model, json.dumps(plan, sort_keys=True), int(time.time() * 1000)))

    def remove_placement(self, model: str) -> None:
        self._tx("DELETE FROM placements WHERE model = ?", (model,))

    def add_event(self, event_id: int, at_ms: int, kind: str, subject: str, message: str, data: dict[str, Any]) -> None:
        self._tx("INSERT INTO events(id, at_ms, kind, subject, message, data_json) VALUES (?, ?, ?, ?, ?, ?)",
                 (event_id, at_ms, kind, subject, message, json.dumps(data, sort_keys=True, default=str)))

    def last_event_id(self) -> int:
        """The highest id ever given to an event (pruned ones included: ids are never reused)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        newest = self._db.execute("SELECT MAX(id) FROM events").fetchone()
        return max(int(row[0]) if row else 0, int(newest[0] or 0))

    def events(self, after_id: int = 0, limit: int = 200) -> list[tuple[int, int, str, str, str, dict[str, Any]]]:
        """The newest `limit` events with an id above `after_id`, oldest first."""
        rows = self._db.execute(
            "SELECT id, at_ms, kind, subject, message, data_json FROM events WHERE id > ? ORDER BY id DESC LIMIT ?",
            (after_id, limit)).fetchall()
        return [(i, at, kind, subject, message, json.loads(data)) for i, at, kind, subject, message, data in reversed(rows)]

    def prune_events(self, keep: int) -> int:
        return self._tx("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?", (keep,))

    def placements(self) -> dict[str, dict[str, Any]]:
        rows = self._db.execute("SELECT model, plan_json FROM placements ORDER BY model").fetchall()
        return {model: json.loads(plan) for model, plan in rows}
