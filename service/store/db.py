"""SQLite metadata store with a versioned schema.

One connection per process, guarded by a lock: SQLite serializes writers anyway and the service's
metadata traffic is small. WAL mode lets readers in other processes (a second server, the CLI) read
while a job writes; ``synchronous=FULL`` makes every acknowledged commit survive power loss. The
schema version lives in ``PRAGMA user_version``; ``MIGRATIONS[i]`` upgrades from version ``i`` to
``i + 1`` inside one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.errors import SchemaTooNew

MIGRATIONS: tuple[str, ...] = (
    # v1: models, calibration sets, jobs, engines, API keys.
    """
    CREATE TABLE models (
        id TEXT PRIMARY KEY,              -- sha256 of the ONNX bytes
        name TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        info_json TEXT NOT NULL,          -- ModelInfo.to_dict()
        source TEXT NOT NULL DEFAULT 'upload',
        parent_id TEXT,                   -- the FP32 model a Q/DQ model was made from
        created_at TEXT NOT NULL
    );
    CREATE TABLE calibration_sets (
        id TEXT PRIMARY KEY,              -- sha256 of the uploaded bytes
        name TEXT NOT NULL,
        format TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        samples INTEGER NOT NULL,
        info_json TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,               -- quantization | build | benchmark | evaluation | comparison
        status TEXT NOT NULL,             -- queued | running | succeeded | failed | cancelled
        phase TEXT NOT NULL DEFAULT '',
        progress REAL NOT NULL DEFAULT 0,
        params_json TEXT NOT NULL,
        result_json TEXT,
        error TEXT,
        log TEXT NOT NULL DEFAULT '',
        dedupe_key TEXT,                  -- identical active jobs share one row (single-flight)
        owner TEXT,                       -- API key id that submitted it
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT
    );
    CREATE INDEX jobs_by_kind ON jobs(kind, created_at);
    CREATE INDEX jobs_by_status ON jobs(status);
    CREATE INDEX jobs_by_dedupe ON jobs(dedupe_key, status);
    CREATE TABLE engines (
        id TEXT PRIMARY KEY,              -- the engine cache key
        model_id TEXT NOT NULL,           -- the model the build was asked for
        built_model_id TEXT NOT NULL,     -- the exact ONNX handed to the backend
        calibration_set_id TEXT,
        backend TEXT NOT NULL,
        backend_version TEXT NOT NULL,
        device TEXT NOT NULL,
        precision TEXT NOT NULL,
        build_config_json TEXT NOT NULL,
        plan_sha256 TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        file_extension TEXT NOT NULL,
        build_seconds REAL NOT NULL,
        report_json TEXT NOT NULL,        -- layer report, fusion verification, accuracy
        calibration_cache_sha256 TEXT,
        created_at TEXT NOT NULL,
        last_used_at TEXT NOT NULL
    );
    CREATE INDEX engines_by_model ON engines(model_id);
    CREATE INDEX engines_by_use ON engines(last_used_at);
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,
        max_upload_bytes INTEGER,
        max_concurrent_jobs INTEGER,
        revoked INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    """,
    # 1 -> 2: remote workers. Who took a running job (so a claim can be retried after a lost answer),
    # and when that worker last said it is alive (so a job whose host was lost does not run forever).
    """
    ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
    ALTER TABLE jobs ADD COLUMN heartbeat_at TEXT;
    """,
    # 2 -> 3: the task a user names on a model (JSON TaskSpec), which picks the accuracy metric.
    """
    ALTER TABLE models ADD COLUMN task_json TEXT;
    """,
    # 3 -> 4: tenancy (service.store.owners). Content stays shared; each owner holds a link. Rows that
    # existed before belong to the local owner (auth off; admin keys see them with auth on), and each job
    # to the key that submitted it, which also keeps the engine, models and sets its job names.
    """
    CREATE TABLE ownership (
        kind TEXT NOT NULL,               -- model | calibration_set | engine | job
        resource_id TEXT NOT NULL,
        owner TEXT NOT NULL,              -- API key id, or 'local' with auth off
        name TEXT,                        -- the owner's own name for it (NULL: the record's name)
        created_at TEXT NOT NULL,
        PRIMARY KEY (kind, resource_id, owner)
    );
    CREATE INDEX ownership_by_owner ON ownership(owner, kind);
    ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0;
    INSERT OR IGNORE INTO ownership SELECT 'model', id, 'local', NULL, created_at FROM models;
    INSERT OR IGNORE INTO ownership
        SELECT 'calibration_set', id, 'local', NULL, created_at FROM calibration_sets;
    INSERT OR IGNORE INTO ownership SELECT 'engine', id, 'local', NULL, created_at FROM engines;
    INSERT OR IGNORE INTO ownership SELECT 'job', id, COALESCE(owner, 'local'), NULL, created_at FROM jobs;
    INSERT OR IGNORE INTO ownership
        SELECT 'engine', json_extract(params_json, '$.engine_id'), owner, NULL, created_at FROM jobs
        WHERE owner IS NOT NULL AND json_extract(params_json, '$.engine_id') IN (SELECT id FROM engines);
    INSERT OR IGNORE INTO ownership
        SELECT 'model', json_extract(params_json, '$.model_id'), owner, NULL, created_at FROM jobs
        WHERE owner IS NOT NULL AND json_extract(params_json, '$.model_id') IN (SELECT id FROM models);
    INSERT OR IGNORE INTO ownership
        SELECT 'calibration_set', json_extract(params_json, '$.calibration_set_id'), owner, NULL,
            created_at
        FROM jobs WHERE owner IS NOT NULL
        AND json_extract(params_json, '$.calibration_set_id') IN (SELECT id FROM calibration_sets);
    INSERT OR IGNORE INTO ownership
        SELECT 'calibration_set', json_extract(params_json, '$.eval_set_id'), owner, NULL,
            created_at
        FROM jobs WHERE owner IS NOT NULL
        AND json_extract(params_json, '$.eval_set_id') IN (SELECT id FROM calibration_sets);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


class Database:
    """A thread-safe SQLite handle with schema migrations applied on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit returns only once the WAL is on disk, so a row a client was told is stored
        # survives power loss (NORMAL could lose the last commits, and start-up reconciliation
        # would then find the row's blob without its row).
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"{self.path} has schema version {version}; this service knows up to {SCHEMA_VERSION}. "
                    "Upgrade the service or point it at another database."
                )
            for target in range(version, SCHEMA_VERSION):
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _split_statements(MIGRATIONS[target]):
                        self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version = {target + 1}")
                    self._conn.execute("COMMIT")
                except Exception:
                    self._conn.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        return int(self.query_one("PRAGMA user_version")[0])  # type: ignore[index]

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run several statements atomically; rolls back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; returns the number of rows changed."""
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row

    def writable(self) -> bool:
        """True when a write transaction can be opened (readiness probe)."""
        try:
            with self.transaction() as conn:
                conn.execute("CREATE TEMP TABLE IF NOT EXISTS _probe (x)")
            return True
        except sqlite3.Error:
            return False

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _split_statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our DDL literals)."""
    statements = []
    for chunk in script.split(";"):
        lines = [line.split("--", 1)[0] for line in chunk.splitlines()]
        statement = "\n".join(lines).strip()
        if statement:
            statements.append(statement)
    return statements
