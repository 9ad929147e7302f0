"""``GET /v1/build-targets``: what a build can be queued for right now, and where it would be built."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from service.api.deps import ServicesDep
from service.builds.targets import all_targets

router = APIRouter(prefix="/v1/build-targets", tags=["builds"])


class BuildTarget(BaseModel):
    backend: str
    version: str
    device: str
    compute_capability: str | None
    built_by: Literal["api-host", "worker"]


@router.get("", response_model=list[BuildTarget])
async def list_build_targets(services: ServicesDep) -> list[dict[str, str | None]]:
    """This host's building backends and the targets live remote workers serve. Give a build's
    ``device`` (part of the device name, or the compute capability) when one backend has several."""
    # Both halves block (backend probes, a Redis round trip): off the event loop.
    return await run_in_threadpool(lambda: all_targets(services.runner.queue.worker_targets()))
