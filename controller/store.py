"""The controller's durable state: SQLite in WAL mode, every change one transaction."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    address     TEXT PRIMARY KEY,
    maintenance INTEGER NOT NULL DEFAULT 0,
    added_at_ms INTEGER NOT NULL
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


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # One connection, used from the event loop's thread only.
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
        return self._tx("DELETE FROM nodes WHERE address = ?", (address,)) == 1

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

    def add_event(self, at_ms: int, kind: str, subject: str, message: str, data: dict[str, Any]) -> int:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self._db.execute(
                "INSERT INTO events(at_ms, kind, subject, message, data_json) VALUES (?, ?, ?, ?, ?)",
                (at_ms, kind, subject, message, json.dumps(data, sort_keys=True, default=str)))
            return int(cursor.lastrowid or 0)

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
