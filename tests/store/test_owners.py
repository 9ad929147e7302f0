"""Ownership links: the schema-4 migration of existing rows, and the visibility rules on real SQLite."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from service.errors import Conflict, NotFound
from service.store.db import MIGRATIONS, Database, _split_statements
from service.store.owners import LOCAL_OWNER, Ownership, Principal

MODEL = "a" * 64
OTHER_MODEL = "b" * 64
SET = "c" * 64
ENGINE = "d" * 64
T = "2026-01-01T00:00:00.000+00:00"


def _database_at_version_3(path: Path) -> None:
    """A database as schema 3 left it, with a model, a set, an engine and two jobs (one per owner)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for script in MIGRATIONS[:3]:
        for statement in _split_statements(script):
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    for model_id in (MODEL, OTHER_MODEL):
        conn.execute(
            "INSERT INTO models (id, name, size_bytes, info_json, created_at) VALUES (?, 'm', 1, '{}', ?)",
            (model_id, T),
        )
    conn.execute(
        "INSERT INTO calibration_sets (id, name, format, size_bytes, samples, info_json, created_at) "
        "VALUES (?, 's', 'npz', 1, 1, '{}', ?)",
        (SET, T),
    )
    conn.execute(
        "INSERT INTO engines (id, model_id, built_model_id, backend, backend_version, device, precision, "
        "build_config_json, plan_sha256, size_bytes, file_extension, build_seconds, report_json, "
        "created_at, last_used_at) "
        "VALUES (?, ?, ?, 'onnxruntime', '1', 'cpu', 'int8', '{}', 'p', 1, '.onnx', 1, '{}', ?, ?)",
        (ENGINE, MODEL, MODEL, T, T),
    )
    params = {"model_id": MODEL, "calibration_set_id": SET, "engine_id": ENGINE}
    conn.execute(
        "INSERT INTO jobs (id, kind, status, params_json, owner, created_at) VALUES ('job1', 'build', "
        "'succeeded', ?, 'key_alice', ?)",
        (json.dumps(params), T),
    )
    conn.execute(
        "INSERT INTO jobs (id, kind, status, params_json, owner, created_at) VALUES ('job2', 'build', "
        "'failed', '{}', NULL, ?)",
        (T,),
    )
    conn.close()


def test_migration_4_gives_old_rows_to_the_local_owner_and_keeps_each_keys_job_inputs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    _database_at_version_3(path)
    db = Database(path)
    owners = Ownership(db)
    assert owners.owners("model", MODEL) == ["key_alice", LOCAL_OWNER]
    assert owners.owners("model", OTHER_MODEL) == [LOCAL_OWNER]
    assert owners.owners("calibration_set", SET) == ["key_alice", LOCAL_OWNER]
    assert owners.owners("engine", ENGINE) == ["key_alice", LOCAL_OWNER]
    assert owners.owners("job", "job1") == ["key_alice"]
    assert owners.owners("job", "job2") == [LOCAL_OWNER]
    assert db.query_one("SELECT admin FROM api_keys") is None  # the column exists; no key yet
    columns = {row[1] for row in db.query("PRAGMA table_info(api_keys)")}
    assert "admin" in columns


@pytest.fixture
def owners(tmp_path: Path) -> Ownership:
    db = Database(tmp_path / "meta.db")
    for model_id in (MODEL, OTHER_MODEL):
        db.execute(
            "INSERT INTO models (id, name, size_bytes, info_json, created_at) VALUES (?, 'm', 1, '{}', ?)",
            (model_id, T),
        )
    return Ownership(db)


def test_a_prefix_resolves_among_the_callers_own_ids_only(owners: Ownership) -> None:
    alice, bob, admin = Principal("alice"), Principal("bob"), Principal("root", admin=True)
    owners.grant("model", MODEL, "alice")
    assert owners.resolve("model", MODEL[:8], alice, missing="none") == MODEL
    with pytest.raises(NotFound, match=r"^none$"):
        owners.resolve("model", MODEL[:8], bob, missing="none")
    with pytest.raises(NotFound):
        owners.resolve("model", MODEL, bob, missing="none")
    assert owners.resolve("model", MODEL, admin, missing="none") == MODEL


def test_an_ambiguous_prefix_lists_only_the_callers_ids(owners: Ownership, tmp_path: Path) -> None:
    db = owners.db
    twins = ["e" * 63 + "1", "e" * 63 + "2"]
    for model_id in twins:
        db.execute(
            "INSERT INTO models (id, name, size_bytes, info_json, created_at) VALUES (?, 'm', 1, '{}', ?)",
            (model_id, T),
        )
    owners.grant("model", twins[0], "alice")
    assert owners.resolve("model", "e" * 10, Principal("alice"), missing="none") == twins[0]
    with pytest.raises(Conflict) as ambiguous:
        owners.resolve("model", "e" * 10, Principal("root", admin=True), missing="none")
    assert ambiguous.value.details["matches"] == twins


def test_release_says_when_the_last_owner_let_go(owners: Ownership) -> None:
    owners.grant("model", MODEL, "alice")
    assert owners.grant("model", MODEL, "bob") is True
    assert owners.grant("model", MODEL, "bob") is False
    assert owners.others_hold("model", MODEL, Principal("alice"))
    assert owners.release("model", MODEL, Principal("alice")) is False
    assert not owners.others_hold("model", MODEL, Principal("bob"))
    assert owners.release("model", MODEL, Principal("bob")) is True
    assert owners.owners("model", MODEL) == []


def test_recovered_rows_go_to_the_local_owner_and_owned_rows_stay_as_they_are(owners: Ownership) -> None:
    db = owners.db
    db.execute(
        "INSERT INTO models (id, name, size_bytes, info_json, source, created_at) "
        "VALUES (?, 'recovered-x.onnx', 1, '{}', 'recovered', ?)",
        ("9" * 64, T),
    )
    db.execute(
        "INSERT INTO calibration_sets (id, name, format, size_bytes, samples, info_json, created_at) "
        "VALUES (?, 'recovered-s', 'npz', 1, 1, '{}', ?)",
        (SET, T),
    )
    owners.grant("model", MODEL, "alice")
    assert owners.adopt_recovered() == 2
    assert owners.owners("model", "9" * 64) == [LOCAL_OWNER]
    assert owners.owners("calibration_set", SET) == [LOCAL_OWNER]
    assert owners.owners("model", MODEL) == ["alice"]  # an upload keeps its owner
    assert owners.owners("model", OTHER_MODEL) == []  # not recovered: left alone
    assert owners.adopt_recovered() == 0
