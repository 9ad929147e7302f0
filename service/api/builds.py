"""Builds: request an engine (cache hit or build job), follow the job, cancel it."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.accuracy.tasks import AccuracyTarget, TaskSpec, targets_of
from service.api.deps import PrincipalDep, ServicesDep
from service.api.jobs_common import BuildPublic, JobDocument, job_public
from service.api.tenancy import cancel_owned, grant, owned_job, owned_model, owned_set
from service.backends.base import ShapeRange
from service.builds.requests import BuildRequest
from service.builds.submit import BUILD_JOB, BuildSubmission, submit_build
from service.catalog.engine_keys import CalibrationOptions
from service.store.owners import ResourceKind, result_resources

router = APIRouter(prefix="/v1/builds", tags=["builds"])


class ShapeRangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: list[int]
    opt: list[int]
    max: list[int]


class CalibrationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["entropy", "max", "percentile", "mse", "auto"] = Field(
        default="auto",
        description="'auto' (default) searches method, per-tensor thresholds and layers kept in float "
        "until the accuracy target holds; a named method is used as is.",
    )
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)
    max_samples: int | None = Field(default=None, ge=1)
    holdout_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    holdout_seed: int = Field(default=0, ge=0, description="Seed of the random draw of held-out samples.")


class BuildCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    precision: Literal["int8", "fp16", "fp32", "auto"] = Field(
        description="'auto': the fastest engine that meets the accuracy target: INT8 when it keeps the "
        "target and (where measurable here) runs faster than FP32, else FP16 (TensorRT family) or FP32."
    )
    backend: Literal["auto", "tensorrt", "tensorrt-rtx", "onnxruntime"] = "auto"
    calibration_set_id: str | None = None
    eval_set_id: str | None = None
    calibration: CalibrationIn = Field(default_factory=CalibrationIn)
    keep: list[str] = Field(default_factory=list, description="Node names, op types, 'first' or 'last'.")
    shapes: dict[str, ShapeRangeIn] = Field(default_factory=dict)
    device: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Which build target, when workers for several devices of this backend are live: "
        "part of the device name (e.g. 'H100') or its compute capability (e.g. 'sm_90').",
    )

    task: TaskSpec | None = Field(
        default=None, description="The task whose metric judges INT8 (default: the model's, else guessed)."
    )
    accuracy_target: AccuracyTarget | list[AccuracyTarget] | None = Field(
        default=None,
        description="What INT8 must keep, e.g. {'metric': 'top1_agreement', 'min': 0.99}; default per task.",
    )

    @model_validator(mode="after")
    def _eval_needs_calibration(self) -> BuildCreate:
        if self.eval_set_id and not self.calibration_set_id:
            raise ValueError("eval_set_id is only used together with calibration_set_id")
        return self

    def to_domain(self) -> BuildRequest:
        return BuildRequest(
            model_id=self.model_id,
            precision=self.precision,
            backend=self.backend,
            calibration_set_id=self.calibration_set_id,
            eval_set_id=self.eval_set_id,
            calibration=CalibrationOptions(**self.calibration.model_dump()),
            task=self.task,
            accuracy_targets=targets_of(self.accuracy_target),
            keep=tuple(self.keep),
            shapes={k: ShapeRange(tuple(v.min), tuple(v.opt), tuple(v.max)) for k, v in self.shapes.items()},
            device=self.device,
        )


class BuildAccepted(BaseModel):
    cache: Literal["hit", "miss"]
    engine_id: str | None = Field(description="None for a precision 'auto' job: known when it has chosen.")
    precision: str | None = Field(default=None, description="The engine's precision (cache hits).")
    precision_choice: dict[str, Any] | None = Field(
        default=None, description="Precision 'auto' answered from the cache: what was chosen and why."
    )
    id: str | None = None
    status: str | None = None
    joined_existing: bool | None = None


@router.post(
    "",
    status_code=202,
    response_model=BuildAccepted,
    responses={200: {"model": BuildAccepted, "description": "Cache hit: the engine exists."}},
)
async def create_build(body: BuildCreate, services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    """Request an engine: 200 with `cache: hit` when it exists, else 202 with the build job."""
    submission = await run_in_threadpool(_submit_owned, body, services, principal)
    if submission.engine is not None:
        hit: dict[str, Any] = {
            "cache": "hit",
            "engine_id": submission.engine.id,
            "precision": submission.engine.precision,
        }
        if submission.precision_choice is not None:
            hit["precision_choice"] = submission.precision_choice.to_dict()
        return JSONResponse(status_code=200, content=hit)
    job, params = submission.job, submission.params
    assert job is not None and params is not None
    content = {
        "cache": "miss",
        "engine_id": params.engine_id,
        "id": job.id,
        "status": job.status,
        "joined_existing": not submission.created,
    }
    return JSONResponse(status_code=202, content=content)


def _submit_owned(body: BuildCreate, services: ServicesDep, principal: PrincipalDep) -> BuildSubmission:
    """Submit with the caller's own model and sets only; the engine (shared through the cache) becomes
    the caller's as soon as it is asked for, so it is visible the moment the build ends."""
    body = body.model_copy(
        update={
            "model_id": owned_model(services, principal, body.model_id).id,
            "calibration_set_id": (
                owned_set(services, principal, body.calibration_set_id).id
                if body.calibration_set_id
                else None
            ),
            "eval_set_id": owned_set(services, principal, body.eval_set_id).id if body.eval_set_id else None,
        }
    )
    submission = submit_build(
        body.to_domain(),
        models=services.models,
        calibration_sets=services.calibration_sets,
        engines=services.engines,
        runner=services.runner,
        owner=principal.owner,
    )
    named: list[tuple[ResourceKind, str]] = []
    if submission.engine is not None:
        named.append(("engine", submission.engine.id))
        if submission.precision_choice is not None:
            named += result_resources({"precision_choice": submission.precision_choice.to_dict()})
    elif submission.params is not None and submission.params.engine_id is not None:
        # Known up front for a concrete precision; a precision "auto" job's engine is linked when it ends.
        named.append(("engine", submission.params.engine_id))
    for kind, resource_id in named:
        grant(services, principal, kind, resource_id)
    return submission


@router.get("", response_model=list[BuildPublic])
def list_builds(
    services: ServicesDep, principal: PrincipalDep, limit: int = Query(default=100, ge=1, le=1000)
) -> list[JobDocument]:
    """Your recent build jobs, newest first."""
    records = services.jobs.list(kind=BUILD_JOB, limit=limit, principal=principal)
    return [job_public(r, services.engines, log_lines=5) for r in records]


@router.get("/{build_id}", response_model=BuildPublic)
def read_build(build_id: str, services: ServicesDep, principal: PrincipalDep) -> JobDocument:
    """A build job: status, progress, phase, log tail, error and, when done, engine_id."""
    return job_public(owned_job(services, principal, build_id, kind=BUILD_JOB), services.engines)


@router.delete("/{build_id}", response_model=BuildPublic)
def cancel_build(build_id: str, services: ServicesDep, principal: PrincipalDep) -> JobDocument:
    """Cancel a queued or running build (finished builds are left as they are; one another key also
    asked for runs on for it, and is no longer yours)."""
    record = cancel_owned(services, principal, owned_job(services, principal, build_id, kind=BUILD_JOB))
    return job_public(record, services.engines)
