"""Model intake: upload, list, read, download, delete, and the static fusion report."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from service.accuracy.tasks import TaskSpec
from service.api.auth import effective_upload_limit
from service.api.deps import PrincipalDep, ServicesDep
from service.api.downloads import file_download
from service.api.tenancy import delete_owned, grant, own_name, own_names, owned_model, visible
from service.api.uploads import receive_upload, upload_body_schema
from service.catalog.names import checked_name

router = APIRouter(prefix="/v1/models", tags=["models"])


class TensorSpecPublic(BaseModel):
    name: str
    dtype: str
    shape: list[int | str]


class ModelQuantizationPublic(BaseModel):
    explicit: bool
    qdq_pairs: int
    per_channel_weights: int
    quantized_ops: dict[str, int]


class ModelPublic(BaseModel):
    id: str
    name: str
    size_bytes: int
    source: str
    parent_id: str | None
    created_at: str
    ir_version: int
    opset: int
    producer: str
    inputs: list[TensorSpecPublic]
    outputs: list[TensorSpecPublic]
    op_counts: dict[str, int]
    quantization: ModelQuantizationPublic
    task: TaskSpec | None = None


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: TaskSpec | None = Field(
        description="The task whose metric judges INT8 accuracy (null: guess it from the outputs).",
        examples=[
            {"kind": "classification"},
            {"kind": "detection", "detection": {"layout": "channels_first", "score_threshold": 0.25}},
            {"kind": "segmentation", "threshold": 0.3},
        ],
    )


class FusionPatternPublic(BaseModel):
    kind: str
    nodes: list[str]
    op_types: list[str]
    activation: str | None = None
    int8_fusable: bool
    blockers: list[str]
    residual_input: str | None = None
    activation_blocker: str | None = None
    expected: Literal["fused", "epilogue", "blocked"] = Field(
        description="What an INT8 build should make of the pattern: fused (one kernel), epilogue (the "
        "activation runs in a pointwise layer after the INT8 convolution) or blocked (see reason)."
    )
    reason: str = Field(description="Why the pattern is not expected to fuse; empty when it is.")


class FusionReportPublic(BaseModel):
    model_id: str
    explicit_quantization: bool
    patterns: list[FusionPatternPublic]
    summary: dict[str, Any]


@router.post(
    "",
    response_model=ModelPublic,
    status_code=201,
    responses={200: {"model": ModelPublic, "description": "The same bytes were uploaded before."}},
    openapi_extra=upload_body_schema({"name": {"type": "string"}}),
)
async def create_model(request: Request, services: ServicesDep, principal: PrincipalDep) -> JSONResponse:
    """Upload an ONNX model (multipart `file`, or a raw body with `?name=`)."""
    upload = await receive_upload(
        request,
        services.model_blobs,
        effective_upload_limit(request, services.settings),  # [auth] per-key
    )
    try:
        name = checked_name(
            upload.fields.get("name") or upload.filename or request.query_params.get("name") or "model.onnx",
            max_chars=services.settings.max_name_chars,
            what="model name",
        )
    except BaseException:
        upload.staged.discard()
        raise
    record, _ = await run_in_threadpool(services.models.register_staged, upload.staged, name)
    # Bytes another key uploaded first are stored once; this key gets its own link (201 when new to it,
    # so the answer says nothing about other keys' uploads).
    linked = await run_in_threadpool(grant, services, principal, "model", record.id, name=name)
    body = await run_in_threadpool(own_name, services, principal, "model", record.to_dict())
    return JSONResponse(status_code=201 if linked else 200, content=body)


@router.get("", response_model=list[ModelPublic])
def list_models(
    services: ServicesDep, principal: PrincipalDep, source: str | None = None
) -> list[dict[str, Any]]:
    """List your models, newest first (filter by `source`: upload, quantization, build, recovered)."""
    records = visible(services, principal, "model", services.models.list(source=source), lambda r: r.id)
    return own_names(services, principal, "model", (record.to_dict() for record in records))


@router.get("/{model_id}", response_model=ModelPublic)
def read_model(model_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """One model's record."""
    return own_name(services, principal, "model", owned_model(services, principal, model_id).to_dict())


@router.patch("/{model_id}", response_model=ModelPublic)
def update_model(
    model_id: str, body: ModelUpdate, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Name the model's task (classification, detection, segmentation, generic) and its metric options."""
    record = services.models.set_task(owned_model(services, principal, model_id).id, body.task)
    return own_name(services, principal, "model", record.to_dict())


@router.get("/{model_id}/onnx", response_class=FileResponse)
def read_model_onnx(model_id: str, services: ServicesDep, principal: PrincipalDep) -> FileResponse:
    """Download the exact bytes of the model."""
    record = owned_model(services, principal, model_id)
    name = services.owners.name_for("model", record.id, principal) or record.name
    filename = name if name.endswith(".onnx") else f"{name}.onnx"
    return file_download(
        services.model_blobs.path_for(record.id),
        media_type="application/octet-stream",
        filename=filename,
        headers={"X-Content-SHA256": record.id},
    )


@router.get("/{model_id}/fusions", response_model=FusionReportPublic)
def read_model_fusions(model_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Static fusion analysis: Conv-BN-ReLU, Conv-BN-Add and friends, with what blocks INT8 fusion."""
    from service.onnx_graph.fusions import analyze_fusions

    record = owned_model(services, principal, model_id)
    analysis = analyze_fusions(services.models.load(record.id))
    return {
        "model_id": record.id,
        "explicit_quantization": analysis.explicit_quantization,
        **analysis.to_dict(),
    }


@router.delete("/{model_id}", status_code=204)
def delete_model(model_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    """Delete your model (its bytes go once no other key holds it and no engine or active job uses it)."""
    record = owned_model(services, principal, model_id)
    delete_owned(services, principal, "model", record.id, services.models.delete)
    return Response(status_code=204)
