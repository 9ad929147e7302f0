"""Quantizations: calibrate an FP32 model into a Q/DQ model as a job; download its calibration cache."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.accuracy.tasks import AccuracyTarget, TaskSpec, targets_of
from service.api.deps import PrincipalDep, ServicesDep
from service.api.downloads import file_download
from service.api.jobs_common import JobDocument, QuantizationPublic, job_public
from service.api.tenancy import cancel_owned, owned_job, owned_model, owned_set
from service.builds.quantization_job import QUANTIZATION_JOB
from service.builds.quantization_params import QuantizationJobParams
from service.errors import BadInput, Conflict
from service.quantize.skip import SkipSpec
from service.services import Services
from service.store.owners import Principal

router = APIRouter(prefix="/v1/quantizations", tags=["quantizations"])


class QuantizationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str
    calibration_set_id: str
    eval_set_id: str | None = None
    method: Literal["entropy", "max", "percentile", "mse", "auto"] = Field(
        default="auto",
        description="'auto' (default) searches method, per-tensor thresholds and layers kept in float "
        "until the accuracy target holds; a named method is used as is.",
    )
    percentile: float = Field(default=99.99, gt=50.0, le=100.0)
    skip: list[str] = Field(default_factory=list, description="Node names, op types, 'first' or 'last'.")
    sensitivity: Literal["off", "rank", "auto"] = "off"
    min_snr_db: float | None = Field(default=None, description="Accuracy bound for sensitivity 'auto'.")
    min_cosine: float | None = Field(default=None, ge=-1.0, le=1.0)
    holdout_fraction: float = Field(default=0.2, ge=0.0, lt=1.0)
    holdout_seed: int = Field(default=0, ge=0, description="Seed of the random draw of held-out samples.")
    task: TaskSpec | None = Field(
        default=None, description="The task whose metric judges INT8 (default: the model's, else guessed)."
    )
    accuracy_target: AccuracyTarget | list[AccuracyTarget] | None = Field(
        default=None,
        description="What INT8 must keep, e.g. {'metric': 'top1_agreement', 'min': 0.99}; default per task.",
    )
    max_samples: int | None = Field(default=None, ge=1)
    target: Literal["tensorrt", "onnxruntime"] = Field(
        default="tensorrt",
        description="Whose Q/DQ placement: 'tensorrt' (TensorRT, TensorRT-RTX) or 'onnxruntime' "
        "(integer kernels of ONNX Runtime's CPU provider; that model is for ONNX Runtime only).",
    )

    @model_validator(mode="after")
    def _bound_for_auto(self) -> QuantizationCreate:
        if self.sensitivity == "auto" and self.min_snr_db is None and self.min_cosine is None:
            raise ValueError("sensitivity 'auto' needs a bound: min_snr_db and/or min_cosine")
        return self


def _validate(body: QuantizationCreate, services: Services, principal: Principal) -> QuantizationCreate:
    """The request with full ids of the caller's own model and sets (a unique prefix names the same
    thing), or a 4xx."""
    model = owned_model(services, principal, body.model_id)
    body = body.model_copy(
        update={
            "model_id": model.id,
            "calibration_set_id": owned_set(services, principal, body.calibration_set_id).id,
            "eval_set_id": owned_set(services, principal, body.eval_set_id).id if body.eval_set_id else None,
        }
    )
    if model.info.quantization.explicit:
        raise BadInput(
            f"Model {body.model_id} already has Q/DQ nodes; build it directly with POST /v1/builds."
        )
    services.calibration_sets.bind(body.calibration_set_id, model.info.inputs)
    if body.eval_set_id:
        services.calibration_sets.bind(body.eval_set_id, model.info.inputs)
    needs_holdout = body.method == "auto" or body.sensitivity != "off"
    if needs_holdout and not body.eval_set_id and body.holdout_fraction <= 0:
        raise BadInput(
            "method 'auto' and sensitivity analysis need held-out samples: "
            "give eval_set_id or holdout_fraction > 0."
        )
    if body.skip:
        SkipSpec.parse(body.skip).resolve(services.models.load(body.model_id))
    return body


@router.post("", status_code=202, response_model=QuantizationPublic)
async def create_quantization(
    body: QuantizationCreate, services: ServicesDep, principal: PrincipalDep
) -> JobDocument:
    """Start calibrating and quantizing an FP32 model; follow it with GET /v1/quantizations/{id}."""
    body = await run_in_threadpool(_validate, body, services, principal)
    params = QuantizationJobParams(
        **body.model_dump(exclude={"accuracy_target", "skip", "task"}),
        skip=tuple(body.skip),
        task=body.task,
        accuracy_targets=targets_of(body.accuracy_target),
    )
    record, _ = await run_in_threadpool(
        services.runner.submit, QUANTIZATION_JOB, params.to_json(), owner=principal.owner
    )
    return job_public(record, services.engines)


@router.get("", response_model=list[QuantizationPublic])
def list_quantizations(
    services: ServicesDep, principal: PrincipalDep, limit: int = Query(default=100, ge=1, le=1000)
) -> list[JobDocument]:
    """Your recent quantization jobs, newest first."""
    records = services.jobs.list(kind=QUANTIZATION_JOB, limit=limit, principal=principal)
    return [job_public(r, services.engines) for r in records]


@router.get("/{job_id}", response_model=QuantizationPublic)
def read_quantization(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobDocument:
    """Status, progress, phase, log tail; on success the Q/DQ model id, accuracy and sensitivity."""
    return job_public(owned_job(services, principal, job_id, kind=QUANTIZATION_JOB), services.engines)


@router.delete("/{job_id}", response_model=QuantizationPublic)
def cancel_quantization(job_id: str, services: ServicesDep, principal: PrincipalDep) -> JobDocument:
    """Cancel a queued or running quantization."""
    record = cancel_owned(services, principal, owned_job(services, principal, job_id, kind=QUANTIZATION_JOB))
    return job_public(record, services.engines)


@router.get("/{job_id}/calibration-cache", response_class=FileResponse)
def read_quantization_calibration_cache(
    job_id: str, services: ServicesDep, principal: PrincipalDep
) -> FileResponse:
    """The TensorRT calibration cache (text format read by IInt8EntropyCalibrator2)."""
    record = owned_job(services, principal, job_id, kind=QUANTIZATION_JOB)
    if record.status != "succeeded" or not record.result:
        raise Conflict(
            f"Quantization {job_id} is {record.status}; its calibration cache exists once it succeeds."
        )
    digest = record.result["calibration_cache_sha256"]
    return file_download(
        services.engines.artifacts.path_for(digest),
        media_type="text/plain",
        filename=f"{job_id[:16]}.calibration.cache",
        headers={"X-Content-SHA256": digest},
    )
