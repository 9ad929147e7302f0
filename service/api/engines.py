"""Engines: list, read, download (plan, calibration cache, the built ONNX), fusion report, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from service.api.deps import PrincipalDep, ServicesDep
from service.api.downloads import file_download
from service.api.schemas_engines import EngineDetail, EngineFusionsPublic, EngineLayersPublic, EnginePublic
from service.api.tenancy import delete_owned, forget_ownerless_models, owned_engine, owned_model, visible
from service.catalog.build_report import BuildReport

router = APIRouter(prefix="/v1/engines", tags=["engines"])


@router.get("", response_model=list[EnginePublic])
def list_engines(
    services: ServicesDep, principal: PrincipalDep, model_id: str | None = None
) -> list[dict[str, Any]]:
    """Your cached engines, newest first (filter by `model_id`)."""
    if model_id is not None:
        model_id = owned_model(services, principal, model_id).id
    records = visible(services, principal, "engine", services.engines.list(model_id=model_id), lambda r: r.id)
    return [record.to_dict() for record in records]


@router.get("/{engine_id}", response_model=EngineDetail)
def read_engine(engine_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Backend, version, device, precision, build config, size, layer counts, fusions and accuracy."""
    record = owned_engine(services, principal, engine_id)
    report = BuildReport.from_dict(record.report)
    body = record.to_dict()
    body["preparation"] = list(report.preparation)
    body["kept_layers"] = list(report.kept_layers)
    body["quantization"] = report.quantization
    return body


@router.get("/{engine_id}/layers", response_model=EngineLayersPublic, response_model_exclude_unset=True)
def read_engine_layers(engine_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Every engine layer with its type, precision, tensor types and the ONNX nodes fused into it."""
    record = owned_engine(services, principal, engine_id)
    return {"engine_id": record.id, **BuildReport.from_dict(record.report).layers}


@router.get("/{engine_id}/fusions", response_model=EngineFusionsPublic, response_model_exclude_unset=True)
def read_engine_fusions(engine_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """Static fusion patterns checked against the built engine's layers."""
    record = owned_engine(services, principal, engine_id)
    return {
        "engine_id": record.id,
        "backend": record.backend,
        "device": record.device,
        **BuildReport.from_dict(record.report).fusions,
    }


@router.get("/{engine_id}/plan", response_class=FileResponse)
def read_engine_plan(engine_id: str, services: ServicesDep, principal: PrincipalDep) -> FileResponse:
    """Download the engine bytes (verified against their sha256 first)."""
    record = owned_engine(services, principal, engine_id)
    path = services.engines.verified_plan_path(record.id)
    return file_download(
        path,
        media_type="application/octet-stream",
        filename=f"{record.id[:16]}-{record.precision}-{record.backend}{record.file_extension}",
        headers={"X-Content-SHA256": record.plan_sha256},
    )


@router.get("/{engine_id}/calibration-cache", response_class=FileResponse)
def read_engine_calibration_cache(
    engine_id: str, services: ServicesDep, principal: PrincipalDep
) -> FileResponse:
    """Download the TensorRT calibration cache the service computed for this engine."""
    engine_id = owned_engine(services, principal, engine_id).id
    path = services.engines.calibration_cache_path(engine_id)
    return file_download(
        path,
        media_type="text/plain",
        filename=f"{engine_id[:16]}.calibration.cache",
        headers={"X-Content-SHA256": path.name},
    )


@router.get("/{engine_id}/model.onnx", response_class=FileResponse)
def read_engine_model(engine_id: str, services: ServicesDep, principal: PrincipalDep) -> FileResponse:
    """Download the exact ONNX that was handed to the builder."""
    record = owned_engine(services, principal, engine_id)
    return file_download(
        services.model_blobs.path_for(record.built_model_id),
        media_type="application/octet-stream",
        filename=f"{record.id[:16]}-built.onnx",
        headers={"X-Content-SHA256": record.built_model_id},
    )


@router.delete("/{engine_id}", status_code=204)
def delete_engine(engine_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    """Remove your engine (from the cache once no other key holds it)."""
    record = owned_engine(services, principal, engine_id)
    delete_owned(services, principal, "engine", record.id, services.engines.delete)
    if not services.owners.owners("engine", record.id):  # gone for everyone: so may be a model kept for it
        forget_ownerless_models(services, (record.model_id, record.built_model_id))
    return Response(status_code=204)
