"""Accepting a build request: validate, look up the cache, or queue one job per distinct engine."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from service.backends.registry import resolve_backend
from service.backends.shapes import shape_ranges_for
from service.builds.cache import EngineCache, EngineRecord
from service.builds.requests import BuildRequest, build_config_from_request, engine_key
from service.builds.targets import build_target
from service.catalog.calibration_sets import CalibrationCatalog
from service.catalog.models import ModelCatalog
from service.errors import BadInput
from service.jobs.records import JobRecord
from service.jobs.runner import JobRunner
from service.quantize.skip import SkipSpec

BUILD_JOB = "build"


@dataclass(frozen=True)
class BuildSubmission:
    """Either a cache hit (``engine``) or a build job (``job``, ``created`` False when joined)."""

    engine: EngineRecord | None = None
    job: JobRecord | None = None
    created: bool = False


def submit_build(
    request: BuildRequest,
    *,
    models: ModelCatalog,
    calibration_sets: CalibrationCatalog,
    engines: EngineCache,
    runner: JobRunner,
    owner: str | None = None,
) -> BuildSubmission:
    model = models.get(request.model_id)
    # Short ids (a unique prefix) name the same things as full ids, so the engine key takes full ids.
    request = replace(
        request,
        model_id=model.id,
        calibration_set_id=calibration_sets.get(request.calibration_set_id).id
        if request.calibration_set_id
        else None,
        eval_set_id=calibration_sets.get(request.eval_set_id).id if request.eval_set_id else None,
    )
    backend = resolve_backend(request.backend)
    target = build_target(backend, runner.queue.worker_targets(), device=request.device)
    if backend.name == "onnxruntime" and request.precision == "fp16":
        raise BadInput(
            "The onnxruntime backend builds CPU engines, where FP16 brings no speed; "
            "ask for fp32 or int8, or use backend 'tensorrt-rtx' for an FP16 GPU engine."
        )
    config = build_config_from_request(request, model.info, model.task)
    # TensorRT-family builders need a range for every dynamic input; ONNX Runtime takes any shape.
    shape_ranges_for(model.info.inputs, request.shapes, complete=backend.name != "onnxruntime")
    if request.keep:
        SkipSpec.parse(list(request.keep)).resolve(models.load(request.model_id))  # unknown names -> 400
    if config.calibration is not None:
        assert request.calibration_set_id is not None  # build_config_from_request guarantees it
        calibration_sets.bind(request.calibration_set_id, model.info.inputs)
        if request.eval_set_id:
            calibration_sets.bind(request.eval_set_id, model.info.inputs)
        if (
            config.calibration.method == "auto"
            and not request.eval_set_id
            and config.calibration.holdout_fraction <= 0
        ):
            raise BadInput(
                "method 'auto' searches for the configuration that meets the accuracy target on "
                "held-out samples: "
                "give eval_set_id or holdout_fraction > 0."
            )
    key = engine_key(request, config, target)
    cached = engines.lookup(key.digest)
    if cached is not None:
        return BuildSubmission(engine=cached)
    params: dict[str, Any] = {
        "key": key.canonical(),
        "engine_id": key.digest,
        "model_id": request.model_id,
        "calibration_set_id": key.calibration_set_id,
        "eval_set_id": request.eval_set_id,
    }
    job, created = runner.submit(BUILD_JOB, params, dedupe_key=key.digest, owner=owner)
    return BuildSubmission(job=job, created=created)
