"""The public shape shared by every job resource (quantizations, builds, reports)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from service.jobs.records import JobRecord


class JobPublic(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str
    progress: float
    error: str | None
    log_tail: list[str]
    created_at: str
    started_at: str | None
    finished_at: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    # Shortfalls are never silent: an INT8 result below its accuracy target says so here, first.
    target_met: bool | None = None
    warnings: list[str] = []


def job_public(record: JobRecord, *, log_lines: int = 40) -> dict[str, Any]:
    return {
        "id": record.id,
        "kind": record.kind,
        "status": record.status,
        "phase": record.phase,
        "progress": round(record.progress, 4),
        "error": record.error,
        "log_tail": record.log_tail(log_lines),
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "params": record.params,
        "result": record.result,
        "target_met": (record.result or {}).get("target_met"),
        "warnings": list((record.result or {}).get("warnings") or []),
    }
