from __future__ import annotations

import sqlite3
from pathlib import Path

from llamafleet.controller.store import Store


def test_nodes_and_placements_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "controller.sqlite3"
    store = Store(path)
    assert store.add_node("10.0.0.1:50051") and not store.add_node("10.0.0.1:50051")
    store.add_node("10.0.0.2:50051")
    assert store.set_maintenance("10.0.0.2:50051", True)
    assert not store.set_maintenance("10.9.9.9:1", True)
    store.save_placement("gemma", {"backends": ["10.0.0.1:50052"], "tensor_split": [19]})
    store.close()

    again = Store(path)
    assert again.nodes() == [("10.0.0.1:50051", False), ("10.0.0.2:50051", True)]
    assert again.placements() == {"gemma": {"backends": ["10.0.0.1:50052"], "tensor_split": [19]}}
    assert again.remove_node("10.0.0.1:50051") and not again.remove_node("10.0.0.1:50051")
    again.remove_placement("gemma")
    assert again.placements() == {}
    again.close()


def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite3"
    Store(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
