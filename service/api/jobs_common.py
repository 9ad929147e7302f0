"""The one mapping from a job row to what the API shows of it, for every kind of job.

:func:`job_public` is what every route that returns a job answers with: :class:`BuildPublic` for
build jobs, :class:`QuantizationPublic` for quantization jobs, :class:`JobPublic` for report jobs.
:func:`job_state` is the part every job document shares, the remote workers' included.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.builds.job_params import BuildJobParams
from service.builds.quantization_job import QUANTIZATION_JOB
from service.builds.submit import BUILD_JOB
from service.catalog.engines import EngineCache
from service.errors import InvalidJobParams
from service.jobs.records import JobRecord

EngineState = Literal["available", "evicted", "deleted", "damaged"]


class JobState(BaseModel):
    """What every job document holds: identity, progress and the params it was submitted with."""

    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str
    progress: float
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    params: dict[str, Any]


class JobDocument(JobState):
    """What every job document adds to the state; each kind's document types its own ``result``."""

    log_tail: list[str]
    # Shortfalls are never silent: an INT8 result below its accuracy target says so here, first.
    target_met: bool | None = None
    warnings: list[str] = []


class JobPublic(JobDocument):
    """A report job (benchmark, evaluation, comparison) as the API shows it."""

    result: dict[str, Any] | None


class _StoredResult(BaseModel):
    """A job result shown as stored: the fields every result of the kind holds are declared (typed),
    the rest is passed on as it is. Optional fields are left undeclared on purpose: a declared one
    would show up as null in results that do not hold it, and change the JSON."""

    model_config = ConfigDict(extra="allow")


class BuildResult(_StoredResult):
    """A succeeded build job's result: the engine and whether it came from the cache; a fresh build
    adds its evidence (build_seconds, task, target_met, int8_share, speed, warnings), precision "auto"
    its choice (precision, precision_choice), a removed engine the note why (engine_removed)."""

    # Always present. "cache" ("hit" or "miss") is left undeclared: a remote worker's result omits it.
    engine_id: str


class BuildPublic(JobDocument):
    """A build job as the API shows it."""

    # A succeeded build's result; whatever else a job was finished with is shown as it is.
    result: BuildResult | dict[str, Any] | None
    engine_id: str | None = None
    engine_state: EngineState | None = Field(
        default=None,
        description="Once succeeded: whether engine_id can be fetched now, or why it left the cache.",
    )
    engine_message: str | None = None


class QuantizationResult(_StoredResult):
    """A succeeded quantization's result: the Q/DQ model, its calibration cache and the evidence
    (samples used, method, accuracy, kept layers...)."""

    qdq_model_id: str
    calibration_cache_sha256: str
    calibration_samples: int
    holdout_samples: int


class QuantizationPublic(JobDocument):
    """A quantization job as the API shows it."""

    result: QuantizationResult | dict[str, Any] | None
    qdq_model_id: str | None = None


def public_params(record: JobRecord) -> dict[str, Any]:
    """The job's params as the API shows them: a build job's with the ids derived from its key."""
    if record.kind != BUILD_JOB:
        return record.params
    try:
        return BuildJobParams.from_json(record.params).to_public()
    except InvalidJobParams:  # shown as stored: running it fails with the reason, listing it must not
        return record.params


def job_state(record: JobRecord) -> dict[str, Any]:
    """The fields of :class:`JobState` for ``record``."""
    return {
        "id": record.id,
        "kind": record.kind,
        "status": record.status,
        "phase": record.phase,
        "progress": round(record.progress, 4),
        "error": record.error,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "params": public_params(record),
    }


def job_public(record: JobRecord, engines: EngineCache, *, log_lines: int = 40) -> JobDocument:
    """The document of any job: its kind's model, filled in from the row (and, for a succeeded build,
    whether its engine is still in ``engines``)."""
    result = record.result or {}
    fields: dict[str, Any] = {
        **job_state(record),
        "log_tail": record.log_tail(log_lines),
        "result": record.result,
        "target_met": result.get("target_met"),
        "warnings": list(result.get("warnings") or []),
    }
    if record.kind == BUILD_JOB:
        return BuildPublic(**fields, **_engine_fields(record, engines))
    if record.kind == QUANTIZATION_JOB:
        return QuantizationPublic(**fields, qdq_model_id=result.get("qdq_model_id"))
    return JobPublic(**fields)


def _engine_fields(record: JobRecord, engines: EngineCache) -> dict[str, Any]:
    """engine_id, engine_state and engine_message of a build job (all None until it succeeded)."""
    if record.status != "succeeded" or not record.result:
        return {"engine_id": None, "engine_state": None, "engine_message": None}
    engine_id = record.result.get("engine_id")
    if engine_id and engines.exists(engine_id):  # rebuilt since it was removed, or never was
        return {"engine_id": engine_id, "engine_state": "available", "engine_message": None}
    removed = record.result.get("engine_removed") or {}
    return {
        "engine_id": engine_id,
        "engine_state": removed.get("reason", "damaged"),
        "engine_message": removed.get(
            "message", "The engine is no longer stored; send the same build request again to rebuild it."
        ),
    }
