"""Triton export: download a cached engine as a Triton Inference Server model repository."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from service.api.deps import ServicesDep
from service.api.downloads import file_download
from service.export.triton import export_for_triton

router = APIRouter(prefix="/v1/engines", tags=["engines"])

EXPORTS_DIR = ".exports"  # under the engines root: the same volume, so large archives fit


@router.get("/{engine_id}/triton", response_class=FileResponse)
def read_engine_triton_repository(
    engine_id: str,
    services: ServicesDep,
    name: Annotated[
        str | None,
        Query(
            description="Triton model name (its repository directory); default <model>_<precision>_<backend>."
        ),
    ] = None,
) -> FileResponse:
    """Download a Triton model repository (.tar.gz): `<name>/config.pbtxt` and the engine as version 1."""
    export = export_for_triton(
        services.engines,
        services.models,
        engine_id,
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
