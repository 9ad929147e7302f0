"""Calibration sets: upload (.npz, .npy, or image archives with preprocessing), list, read, delete."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.api.auth import effective_upload_limit
from service.api.deps import PrincipalDep, ServicesDep
from service.api.schemas_engines import CalibrationSetPublic, CalibrationSetValidation
from service.api.tenancy import delete_owned, grant, own_name, own_names, owned_model, owned_set, visible
from service.api.uploads import receive_upload, upload_body_schema
from service.catalog.names import checked_name
from service.datasets.preprocess import PreprocessSpec
from service.datasets.preprocess_examples import PREPROCESS_EXAMPLES
from service.errors import BadInput

router = APIRouter(prefix="/v1/calibration-sets", tags=["calibration sets"])

_FORM_FIELDS = {
    "name": {"type": "string"},
    "preprocess": {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"$ref": "#/components/schemas/PreprocessSpec"},
        "description": "Required for image archives (PNG/JPEG in .zip/.tar): a JSON PreprocessSpec saying "
        "how each image becomes one model input sample (schema: PreprocessSpec). Worked examples, in order: "
        + " ".join(f"({n}) {e.title}: {e.explanation}" for n, e in enumerate(PREPROCESS_EXAMPLES, 1)),
        "examples": [json.dumps(e.spec) for e in PREPROCESS_EXAMPLES],
    },
    "model_id": {"type": "string", "description": "Validate the set against this model's inputs at upload."},
}


def _parse_preprocess(text: str | None) -> PreprocessSpec | None:
    if not text:
        return None
    try:
        payload = json.loads(text)
    # ValueError also covers Python's limit on integer digits, which JSONDecodeError does not.
    except ValueError as exc:
        raise BadInput(f"The 'preprocess' field is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadInput("The 'preprocess' field is nested too deeply; it is a flat JSON object.") from exc
    try:
        return PreprocessSpec.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadInput(f"The 'preprocess' field is invalid: {problems}") from exc


@router.post(
    "",
    status_code=201,
    openapi_extra=upload_body_schema(_FORM_FIELDS),
    responses={
        201: {"model": CalibrationSetPublic, "description": "The set was stored."},
        200: {"model": CalibrationSetPublic, "description": "The same set was already stored."},
    },
)
async def create_calibration_set(
    request: Request, services: ServicesDep, principal: PrincipalDep
) -> JSONResponse:
    """Upload a calibration set; with `model_id`, it is validated against that model's inputs."""
    catalog = services.calibration_sets
    upload = await receive_upload(
        request,
        services.calibration_uploads,
        effective_upload_limit(request, services.settings),  # [auth]
    )
    try:
        preprocess = _parse_preprocess(upload.fields.get("preprocess"))
        model_id = upload.fields.get("model_id") or request.query_params.get("model_id")
        model_inputs = owned_model(services, principal, model_id).info.inputs if model_id else None
        name = checked_name(
            upload.fields.get("name") or upload.filename or request.query_params.get("name") or "calibration",
            max_chars=services.settings.max_name_chars,
            what="calibration set name",
        )
    except BaseException:
        upload.staged.discard()
        raise
    record, _ = await run_in_threadpool(
        catalog.register_staged, upload.staged, name, preprocess=preprocess, model_inputs=model_inputs
    )
    # Stored once however many keys upload it; 201 when the set is new to this key.
    linked = await run_in_threadpool(grant, services, principal, "calibration_set", record.id, name=name)
    body = await run_in_threadpool(own_name, services, principal, "calibration_set", record.to_dict())
    public = CalibrationSetPublic.model_validate(body)
    return JSONResponse(status_code=201 if linked else 200, content=public.model_dump(mode="json"))


@router.get("", response_model=list[CalibrationSetPublic])
def list_calibration_sets(services: ServicesDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    """List your calibration sets, newest first."""
    records = visible(
        services, principal, "calibration_set", services.calibration_sets.list(), lambda r: r.id
    )
    return own_names(services, principal, "calibration_set", (record.to_dict() for record in records))


@router.get("/{set_id}", response_model=CalibrationSetPublic)
def read_calibration_set(set_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """One calibration set: format, samples, per-input shape, dtype and stats."""
    return own_name(services, principal, "calibration_set", owned_set(services, principal, set_id).to_dict())


@router.get("/{set_id}/validate", response_model=CalibrationSetValidation)
def validate_calibration_set(
    set_id: str, model_id: str, services: ServicesDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Check a set against a model's inputs; 400 says what does not fit."""
    calibration_set = owned_set(services, principal, set_id)
    model = owned_model(services, principal, model_id)
    binding = services.calibration_sets.bind(calibration_set.id, model.info.inputs)
    return {"calibration_set_id": calibration_set.id, "model_id": model.id, "valid": True, "binding": binding}


@router.delete("/{set_id}", status_code=204)
def delete_calibration_set(set_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    """Delete your calibration set (its files go once no other key holds it and no active job uses it)."""
    record = owned_set(services, principal, set_id)
    delete_owned(services, principal, "calibration_set", record.id, services.calibration_sets.delete)
    return Response(status_code=204)
