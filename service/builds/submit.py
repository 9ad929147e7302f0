"""Accepting a build request: validate, look up the cache, or queue one job per distinct engine."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import partial

from service.backends.base import Backend, BackendInfo
from service.backends.capabilities import capabilities_of
from service.backends.registry import resolve_backend
from service.backends.shapes import shape_ranges_for
from service.builds.auto_precision import Int8Evidence, PrecisionChoice, choose_precision, fallback_precision
from service.builds.job_params import AutoChoiceParams, BuildJobParams
from service.builds.requests import BuildRequest, build_config_from_request, engine_key
from service.builds.targets import build_target
from service.catalog.calibration_sets import CalibrationCatalog
from service.catalog.engine_keys import EngineKey
from service.catalog.engines import EngineCache, EngineRecord
from service.catalog.models import ModelCatalog, ModelRecord
from service.errors import BadInput
from service.jobs.records import JobRecord
from service.jobs.runner import JobRunner
from service.quantize.skip import SkipSpec

BUILD_JOB = "build"


@dataclass(frozen=True)
class BuildSubmission:
    """Either a cache hit (``engine``) or a build job (``job`` with its ``params``, ``created`` False
    when joined)."""

    engine: EngineRecord | None = None
    job: JobRecord | None = None
    created: bool = False
    precision_choice: PrecisionChoice | None = None  # precision "auto" answered from the cache
    params: BuildJobParams | None = None


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
    if request.precision == "auto":
        return _submit_auto(
            request,
            model,
            backend,
            target,
            models=models,
            calibration_sets=calibration_sets,
            engines=engines,
            runner=runner,
            owner=owner,
        )
    key = _validated_key(request, model, backend, target, models=models, calibration_sets=calibration_sets)
    cached = engines.lookup(key.digest)
    if cached is not None:
        return BuildSubmission(engine=cached)
    params = BuildJobParams(key=key, eval_set_id=request.eval_set_id)
    job, created = runner.submit(BUILD_JOB, params.to_json(), dedupe_key=key.digest, owner=owner)
    return BuildSubmission(job=job, created=created, params=params)


def _validated_key(
    request: BuildRequest,
    model: ModelRecord,
    backend: Backend,
    target: BackendInfo,
    *,
    models: ModelCatalog,
    calibration_sets: CalibrationCatalog,
) -> EngineKey:
    """The engine key of a concrete-precision request, after every check that can fail it early."""
    capabilities = capabilities_of(backend.name)
    if not capabilities.fp16 and request.precision == "fp16":
        raise BadInput(
            "The onnxruntime backend builds CPU engines, where FP16 brings no speed; "
            "ask for fp32 or int8, or use backend 'tensorrt-rtx' for an FP16 GPU engine."
        )
    config = build_config_from_request(request, model.info, model.task)
    # TensorRT-family builders need a range for every dynamic input; ONNX Runtime takes any shape.
    shape_ranges_for(model.info.inputs, request.shapes, complete=capabilities.complete_shape_ranges)
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
    return engine_key(request, config, target)


def _submit_auto(
    request: BuildRequest,
    model: ModelRecord,
    backend: Backend,
    target: BackendInfo,
    *,
    models: ModelCatalog,
    calibration_sets: CalibrationCatalog,
    engines: EngineCache,
    runner: JobRunner,
    owner: str | None,
) -> BuildSubmission:
    """``precision: "auto"`` (see service.builds.auto_precision): answered from the cache when the
    INT8 engine's evidence already decides it and the chosen engine exists, else one job."""
    fallback = fallback_precision(backend.name)
    if not model.info.quantization.explicit and request.calibration_set_id is None:
        raise BadInput(
            f"precision 'auto' chooses between INT8 and {fallback.upper()} by INT8's accuracy and speed, "
            "so an FP32 model needs a calibration_set_id (upload one with POST /v1/calibration-sets); "
            f"or ask for precision '{fallback}'."
        )
    check = partial(
        _validated_key,
        model=model,
        backend=backend,
        target=target,
        models=models,
        calibration_sets=calibration_sets,
    )
    int8_key = check(replace(request, precision="int8"))
    fallback_key = check(replace(request, precision=fallback, calibration_set_id=None, eval_set_id=None))
    evidence: Int8Evidence | None = None
    cached_int8 = engines.lookup(int8_key.digest)
    if cached_int8 is not None:  # the INT8 engine's own evidence decides
        evidence = Int8Evidence.from_report(cached_int8.id, cached_int8.report)
        choice = choose_precision(evidence, fallback)
        chosen = cached_int8 if choice.chosen == "int8" else engines.lookup(fallback_key.digest)
        if chosen is not None:
            return BuildSubmission(engine=chosen, precision_choice=choice)
    params = BuildJobParams(
        key=int8_key,
        eval_set_id=request.eval_set_id,
        auto=AutoChoiceParams(fallback_key=fallback_key, int8_evidence=evidence),
    )
    dedupe = hashlib.sha256(f"auto:{int8_key.digest}:{fallback_key.digest}".encode()).hexdigest()
    job, created = runner.submit(BUILD_JOB, params.to_json(), dedupe_key=dedupe, owner=owner)
    return BuildSubmission(job=job, created=created, params=params)
