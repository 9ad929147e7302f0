"""Job rows in SQLite: the durable half of the job runner.

Every state change is written through here, so a job's status, progress, phase and log survive the
process. ``mark_interrupted`` is run at start-up: whatever was ``running`` when the previous process
died is failed with a reason a person can act on.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from service.errors import NotFound
from service.store.clock import utc_now
from service.store.db import Database
from service.store.ids import resolve_id
from service.store.owners import LOCAL_OWNER, LOCAL_PRINCIPAL, Principal, grant_job_results, owned_filter

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATUSES: tuple[JobStatus, ...] = ("queued", "running")
FINAL_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")
LOG_LIMIT_CHARS = 64_000  # keep the newest part of long logs
INTERRUPTED_REASON = (
    "interrupted: the server stopped while this job was running; nothing it produced was kept. "
    "Submit the same request again to retry."
)


def _link_owner(conn: sqlite3.Connection, job_id: str, owner: str | None) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO ownership (kind, resource_id, owner, created_at) VALUES ('job', ?, ?, ?)",
        (job_id, owner if owner is not None else LOCAL_OWNER, utc_now()),
    )


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    status: JobStatus
    phase: str
    progress: float
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    log: str
    dedupe_key: str | None
    owner: str | None
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    claimed_by: str | None = None  # the worker execution that took it (remote workers name themselves)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def log_tail(self, lines: int = 40) -> list[str]:
        return self.log.splitlines()[-lines:]


def _row_to_record(row: Any) -> JobRecord:
    return JobRecord(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        phase=row["phase"],
        progress=float(row["progress"]),
        params=json.loads(row["params_json"]),
        result=json.loads(row["result_json"]) if row["result_json"] else None,
        error=row["error"],
        log=row["log"],
        dedupe_key=row["dedupe_key"],
        owner=row["owner"],
        cancel_requested=bool(row["cancel_requested"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        claimed_by=row["claimed_by"],
    )


class JobStore:
    """CRUD and state transitions for job rows."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def location(self) -> str:
        return f"the database {self.db.path}"

    def create(
        self, kind: str, params: dict[str, Any], *, dedupe_key: str | None, owner: str | None
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job, or return the active job with the same dedupe key (created=False)."""
        with self.db.transaction() as conn:
            if dedupe_key is not None:
                row = conn.execute(
                    "SELECT * FROM jobs WHERE dedupe_key = ? AND status IN ('queued', 'running') "
                    "ORDER BY created_at LIMIT 1",
                    (dedupe_key,),
                ).fetchone()
                if row is not None:
                    # The caller joins the running job: it becomes one of its owners (it sees it, and
                    # what it makes), without a second row or a second run.
                    _link_owner(conn, row["id"], owner)
                    return _row_to_record(row), False
            job_id = uuid.uuid4().hex
            conn.execute(
                "INSERT INTO jobs (id, kind, status, params_json, dedupe_key, owner, created_at) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, kind, json.dumps(params, sort_keys=True), dedupe_key, owner, utc_now()),
            )
            _link_owner(conn, job_id, owner)
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _row_to_record(row), True

    def get(self, job_id: str, *, kind: str | None = None) -> JobRecord:
        """The job ``job_id`` names exactly or by a unique prefix (Conflict when ambiguous)."""
        full_id = resolve_id(self.db, "jobs", job_id, noun="job")
        row = None if full_id is None else self.db.query_one("SELECT * FROM jobs WHERE id = ?", (full_id,))
        if row is None or (kind is not None and row["kind"] != kind):
            what = f"{kind} job" if kind else "job"
            raise NotFound(f"No {what} with id '{job_id}'.")
        return _row_to_record(row)

    def list(
        self, *, kind: str | None = None, limit: int = 100, principal: Principal = LOCAL_PRINCIPAL
    ) -> builtins.list[JobRecord]:
        """The newest jobs the principal sees (all of them for an admin), optionally of one kind."""
        condition, params = owned_filter("job", principal)
        if kind is not None:
            condition, params = f"{condition} AND kind = ?", (*params, kind)
        rows = self.db.query(
            f"SELECT * FROM jobs WHERE {condition} ORDER BY created_at DESC LIMIT ?", (*params, limit)
        )
        return [_row_to_record(r) for r in rows]

    def running_elsewhere(self, job_id: str) -> builtins.list[str]:
        """The other running jobs as "kind id", less those waiting for the host (phase "waiting for ...")."""
        rows = self.db.query(
            "SELECT id, kind FROM jobs WHERE status = 'running' AND id != ? "
            "AND phase NOT LIKE 'waiting for %' ORDER BY started_at",
            (job_id,),
        )
        return [f"{row['kind']} {row['id']}" for row in rows]

    def queued_ids(self) -> builtins.list[str]:
        return [
            r["id"] for r in self.db.query("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at")
        ]

    def count_active(self, *, owner: str | None = None) -> int:
        if owner is None:
            row = self.db.query_one("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')")
        else:
            row = self.db.query_one(
                "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') AND owner = ?", (owner,)
            )
        return int(row[0]) if row else 0

    def counts_by_status(self) -> dict[tuple[str, str], int]:
        rows = self.db.query("SELECT kind, status, COUNT(*) AS n FROM jobs GROUP BY kind, status")
        return {(r["kind"], r["status"]): int(r["n"]) for r in rows}

    def mark_running(self, job_id: str, *, claimant: str | None = None) -> bool:
        """queued -> running; False when the job is no longer queued (cancelled meanwhile, or taken).

        With a ``claimant``, claiming again as the same claimant is answered True (a retried request
        whose first answer was lost), so exactly one execution owns the job either way.
        """
        now = utc_now()
        with self.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, claimed_by = ?, heartbeat_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (now, claimant, now if claimant is not None else None, job_id),
            ).rowcount
            if changed == 1:
                return True
            if claimant is None:
                return False
            row = conn.execute("SELECT status, claimed_by FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return row is not None and row["status"] == "running" and row["claimed_by"] == claimant

    def beat(self, job_id: str) -> bool:
        """A remote worker says it is still running the job; False when the job no longer runs."""
        return (
            self.db.execute(
                "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND status = 'running'", (utc_now(), job_id)
            )
            == 1
        )

    def fail_silent(self, lease_s: float, reason: str) -> builtins.list[str]:
        """Fail the remotely claimed running jobs whose worker has not beaten for ``lease_s``."""
        cutoff = datetime.fromtimestamp(time.time() - lease_s, UTC).isoformat(timespec="milliseconds")
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT id FROM jobs "
                "WHERE status = 'running' AND claimed_by IS NOT NULL AND heartbeat_at < ?",
                (cutoff,),
            ).fetchall()
            ids = [row["id"] for row in rows]
            for job_id in ids:
                conn.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, finished_at = ?, "
                    "log = substr(log || ?, -?) WHERE id = ? AND status = 'running'",
                    (reason, utc_now(), f"{time.strftime('%H:%M:%S')} {reason}\n", LOG_LIMIT_CHARS, job_id),
                )
        return ids

    def update_progress(self, job_id: str, progress: float, phase: str | None) -> None:
        if phase is None:
            self.db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress, job_id))
        else:
            self.db.execute("UPDATE jobs SET progress = ?, phase = ? WHERE id = ?", (progress, phase, job_id))

    def append_log(self, job_id: str, lines: str) -> None:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT log FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return
            log = (row["log"] + lines)[-LOG_LIMIT_CHARS:]
            conn.execute("UPDATE jobs SET log = ? WHERE id = ?", (log, job_id))

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        only_if_running: bool = False,
    ) -> bool:
        """Record the final state; with ``only_if_running``, only a running job (atomically), so two
        reporters of one job's end cannot both win. Returns whether the row changed.

        A succeeded job's results (its engine, its Q/DQ model) are linked to every owner of the job in
        the same transaction, so no owner ever sees a succeeded job whose result it cannot open.
        """
        with self.db.transaction() as conn:
            changed = self._finish(conn, job_id, status, result, error, only_if_running)
            if changed and status == "succeeded" and result is not None:
                grant_job_results(conn, job_id, result)
        return changed

    @staticmethod
    def _finish(
        conn: sqlite3.Connection,
        job_id: str,
        status: JobStatus,
        result: dict[str, Any] | None,
        error: str | None,
        only_if_running: bool,
    ) -> bool:
        changed = conn.execute(
            "UPDATE jobs SET status = ?, result_json = ?, error = ?, finished_at = ?, "
            "progress = CASE WHEN ? = 'succeeded' THEN 1.0 ELSE progress END "
            "WHERE id = ? AND (? = 0 OR status = 'running')",
            (
                status,
                json.dumps(result) if result is not None else None,
                error,
                utc_now(),
                status,
                job_id,
                int(only_if_running),
            ),
        ).rowcount
        return changed == 1

    def request_cancel(self, job_id: str) -> JobRecord:
        """Flag an active job for cancellation; a queued one is cancelled at once."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, "
                "error = 'cancelled before it started' "
                "WHERE id = ? AND status = 'queued'",
                (utc_now(), job_id),
            )
            conn.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,)
            )
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        row = self.db.query_one("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(row and row[0])

    def mark_interrupted(self) -> int:
        """Fail the jobs a previous process left running; returns how many."""
        return self.db.execute(
            "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE status = 'running'",
            (INTERRUPTED_REASON, utc_now()),
        )
