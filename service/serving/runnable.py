"""Whether an engine can run on this host, and if not, what can.

An engine built ahead of time (a TensorRT-RTX plan on a machine without a GPU) is stored and
downloadable, but inference and benchmarks need its backend to run here. :func:`require_runnable`
raises :class:`EngineNotRunnableHere` with a message that names an engine of the same model that
does run here (typically its ``onnxruntime`` twin) or, when there is none, the exact build request
that makes one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from service.backends.base import Availability, Backend
from service.catalog.engines import EngineCache, EngineRecord
from service.errors import EngineNotRunnableHere, ServiceError

BackendLookup = Callable[[str], Backend]
# The backend that runs anywhere: what to suggest building when nothing of the model runs here.
PORTABLE_BACKEND = "onnxruntime"


def default_backend_lookup(name: str) -> Backend:
    from service.backends.registry import get_backend

    return get_backend(name)


def run_availability(backend_name: str, backend_for: BackendLookup) -> Availability:
    """The backend's availability here; an unknown or unloadable backend cannot run."""
    try:
        return backend_for(backend_name).available()
    except ServiceError as exc:  # unknown name, or a backend that cannot even be created here
        return Availability(can_build=False, can_run=False, reason=exc.message)


def runnable_alternatives(
    record: EngineRecord, engines: EngineCache, backend_for: BackendLookup
) -> list[EngineRecord]:
    """Engines of the same model whose backend runs here, FP32 first, then by precision and age."""
    verdicts: dict[str, bool] = {}
    found: list[EngineRecord] = []
    for other in engines.list(model_id=record.model_id):
        if other.id == record.id:
            continue
        if other.backend not in verdicts:
            verdicts[other.backend] = run_availability(other.backend, backend_for).can_run
        if verdicts[other.backend]:
            found.append(other)
    same_precision = [e for e in found if e.precision == record.precision]
    return same_precision + [e for e in found if e.precision != record.precision]


def require_runnable(record: EngineRecord, engines: EngineCache, backend_for: BackendLookup) -> None:
    """Return when ``record``'s backend can run here; else raise EngineNotRunnableHere saying what can."""
    availability = run_availability(record.backend, backend_for)
    if availability.can_run:
        return
    alternatives = runnable_alternatives(record, engines, backend_for)
    head = (
        f"Engine {record.id} is a {record.precision} {record.backend} engine, which cannot run on this host"
        f" ({availability.reason or 'its backend reports it cannot run here'}); download it with "
        f"GET /v1/engines/{record.id}/plan and run it where its backend runs."
    )
    if alternatives:
        best = alternatives[0]
        hint = (
            f" Engine {best.id} ({best.precision}, {best.backend}) of the same model runs here: use "
            f"/v1/engines/{best.id}/infer."
        )
        details: dict[str, object] = {
            "runnable_engine_id": best.id,
            "runnable_engines": [e.id for e in alternatives],
        }
    else:
        request = suggested_build(record)
        hint = (
            f" No engine of this model runs here yet; build one with POST /v1/builds {json.dumps(request)}."
        )
        details = {"suggested_build": request}
    raise EngineNotRunnableHere(head + hint, details=details)


def suggested_build(record: EngineRecord) -> dict[str, object]:
    """The build request for a portable engine of the same model (FP16 is GPU-only: ask for FP32)."""
    request: dict[str, object] = {"model_id": record.model_id, "backend": PORTABLE_BACKEND}
    if record.precision == "int8":
        request["precision"] = "int8"
        if record.calibration_set_id:
            request["calibration_set_id"] = record.calibration_set_id
    else:
        request["precision"] = "fp32"
    return request
