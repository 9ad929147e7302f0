"""Triton export: download a cached engine as a Triton Inference Server model repository."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from service.api.deps import PrincipalDep, ServicesDep
from service.api.downloads import file_download
from service.api.tenancy import owned_engine
from service.export.triton import default_model_name, export_for_triton

router = APIRouter(prefix="/v1/engines", tags=["engines"])

EXPORTS_DIR = ".exports"  # under the engines root: the same volume, so large archives fit


@router.get("/{engine_id}/triton", response_class=FileResponse)
def read_engine_triton_repository(
    engine_id: str,
    services: ServicesDep,
    principal: PrincipalDep,
    name: Annotated[
        str | None,
        Query(
            description="Triton model name (its repository directory); default <model>_<precision>_<backend>."
        ),
    ] = None,
) -> FileResponse:
    """Download a Triton model repository (.tar.gz): `<name>/config.pbtxt` and the engine as version 1."""
    record = owned_engine(services, principal, engine_id)
    if name is None:  # the default names the model as this key calls it, never as another key does
        source_name = services.owners.name_for("model", record.model_id, principal)
        if source_name is None and services.owners.sees("model", record.model_id, principal):
            source_name = services.models.get(record.model_id).name
        name = default_model_name(source_name, record)
    export = export_for_triton(
        services.engines,
        services.models,
        record.id,
        name=name,
        workdir=services.settings.engines_dir / EXPORTS_DIR,
    )
    return file_download(
        export.path,
        media_type="application/gzip",
        filename=export.filename,
        headers={
            "X-Triton-Model-Name": export.config.name,
            "X-Triton-Max-Batch-Size": str(export.config.max_batch_size),
        },
        background=BackgroundTask(export.path.unlink, missing_ok=True),
    )
