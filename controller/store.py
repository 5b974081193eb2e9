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

    def placements(self) -> dict[str, dict[str, Any]]:
        rows = self._db.execute("SELECT model, plan_json FROM placements ORDER BY model").fetchall()
        return {model: json.loads(plan) for model, plan in rows}
