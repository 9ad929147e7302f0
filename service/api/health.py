"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.api.deps import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def read_health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def read_readiness(request: Request, services: ServicesDep) -> JSONResponse:
    """Readiness: storage writable and at least one backend usable (details with an API key)."""
    from service.backends.registry import VERIFICATION, backend_names, backend_statuses

    storage_ok = services.db.writable() and _dirs_writable(services)
    backends: list[dict[str, Any]] = []
    for name, (info, availability) in zip(backend_names(), backend_statuses(), strict=True):
        backends.append(
            {
                "name": name,
                "version": info.version if info else None,
                "device": info.device if info else None,
                "can_build": availability.can_build,
                "can_run": availability.can_run,
                "reason": availability.reason,
            }
        )
    ready = storage_ok and any(b["can_build"] for b in backends)
    status = 200 if ready else 503
    if services.settings.auth_enabled and getattr(request.state, "api_key", None) is None:
        # Anonymous probes (orchestrators) learn ready or not; versions, devices and driver state would
        # tell an attacker what to aim at, so they need a key.
        return JSONResponse(status_code=status, content={"status": "ready" if ready else "not_ready"})
    body = {
        "status": "ready" if ready else "not_ready",
        "storage_writable": storage_ok,
        "backends": backends,
        "verification": VERIFICATION,
    }
    return JSONResponse(status_code=status, content=body)


def _dirs_writable(services: ServicesDep) -> bool:
    import os

    settings = services.settings
    return all(
        os.access(d, os.W_OK) for d in (settings.engines_dir, settings.calibration_dir, settings.models_dir)
    )
