"""SQLite metadata: schema versioning and transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from service.errors import SchemaTooNew
from service.store.db import SCHEMA_VERSION, Database


def test_a_new_database_is_migrated_to_the_current_schema(tmp_path: Path) -> None:
    db = Database(tmp_path / "meta.db")
    assert db.schema_version == SCHEMA_VERSION
    tables = {row[0] for row in db.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"models", "calibration_sets", "jobs", "engines", "api_keys"} <= tables
    db.close()
    assert Database(tmp_path / "meta.db").schema_version == SCHEMA_VERSION  # reopening is a no-op


def test_a_database_from_a_newer_service_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match="Upgrade the service"):
        Database(path)


def test_a_failed_transaction_leaves_no_row(tmp_path: Path) -> None:
    db = Database(tmp_path / "meta.db")
    with pytest.raises(RuntimeError), db.transaction() as conn:
        conn.execute(
            "INSERT INTO models (id, name, size_bytes, info_json, created_at) VALUES ('a', 'n', 1, '{}', 't')"
        )
        raise RuntimeError("boom")
    assert db.query("SELECT * FROM models") == []


def test_commits_are_synced_to_disk_before_they_return(tmp_path: Path) -> None:
    # synchronous=FULL (2): an acknowledged row survives power loss, not only a process crash.
    db = Database(tmp_path / "meta.db")
    assert db.query_one("PRAGMA synchronous")[0] == 2  # type: ignore[index]
    assert db.query_one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
