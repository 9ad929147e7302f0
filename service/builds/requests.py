"""Build requests: validated against the model, the calibration set and the backend before any job.

Everything that can be known wrong at request time is rejected here with a 400, so a queued build
only fails for reasons the builder itself discovers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from service.accuracy.tasks import AccuracyTarget, TaskSpec
from service.backends.base import BackendInfo, Precision, ShapeRange
from service.catalog.engine_keys import BuildConfig, CalibrationOptions, EngineKey
from service.errors import BadInput
from service.onnx_graph.inspect import ModelInfo

# "auto": the fastest engine that meets the accuracy target (service.builds.auto_precision).
RequestedPrecision = Literal["int8", "fp16", "fp32", "auto"]


@dataclass(frozen=True)
class BuildRequest:
    model_id: str
    precision: RequestedPrecision
    backend: str = "auto"
    calibration_set_id: str | None = None
    eval_set_id: str | None = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    keep: tuple[str, ...] = ()
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)
    # Picks one build target when several are live (see service.builds.targets).
    device: str | None = None
    task: TaskSpec | None = None  # None: the model's named task, else guessed
    accuracy_targets: tuple[AccuracyTarget, ...] = ()


def build_config_from_request(
    request: BuildRequest, model: ModelInfo, model_task: TaskSpec | None = None
) -> BuildConfig:
    """Validate what does not depend on the backend and produce the canonical config.

    The task (the request's, else the one named on the model) and the accuracy targets are part of
    the calibration options, hence of the engine key: they decide what the accuracy search keeps.
    "auto" is resolved into concrete requests before this (service.builds.submit).
    """
    precision = _concrete(request.precision)
    if request.precision == "int8" and not model.quantization.explicit and request.calibration_set_id is None:
        raise BadInput(
            "precision 'int8' on an FP32 model needs a calibration_set_id (upload one with "
            "POST /v1/calibration-sets), or upload a model that already has Q/DQ nodes."
        )
    if request.precision != "int8" and request.calibration_set_id is not None:
        raise BadInput(f"calibration_set_id only applies to precision 'int8', not '{request.precision}'.")
    calibration = (
        request.calibration if request.precision == "int8" and not model.quantization.explicit else None
    )
    task = request.task or model_task
    if calibration is not None and (task is not None or request.accuracy_targets):
        calibration = replace(
            calibration,
            task=task.model_dump(exclude_none=True) if task is not None else calibration.task,
            accuracy_targets=tuple(t.model_dump() for t in request.accuracy_targets)
            or calibration.accuracy_targets,
        )
    # The held-out set can change the engine (method "auto" and sensitivity pick by accuracy on it).
    eval_set_id = request.eval_set_id if calibration is not None and request.eval_set_id else None
    return BuildConfig(
        precision=precision,
        keep=tuple(sorted(set(request.keep))),
        shapes=tuple(sorted(request.shapes.items())),
        calibration=calibration,
        eval_set_id=eval_set_id,
    )


def engine_key(request: BuildRequest, config: BuildConfig, backend: BackendInfo) -> EngineKey:
    calibration_set = request.calibration_set_id if config.calibration is not None else None
    return EngineKey(
        model_id=request.model_id, config=config, calibration_set_id=calibration_set, backend=backend
    )


def _concrete(precision: RequestedPrecision) -> Precision:
    if precision == "auto":
        raise ValueError(
            "precision 'auto' has no engine config of its own; resolve it into int8 and fp16/fp32"
        )
    return precision
