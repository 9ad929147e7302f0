"""Build requests: validated against the model, the calibration set and the backend before any job.

Everything that can be known wrong at request time is rejected here with a 400, so a queued build
only fails for reasons the builder itself discovers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.backends.base import BackendInfo, Precision, ShapeRange
from service.builds.keys import BuildConfig, CalibrationOptions, EngineKey
from service.errors import BadInput
from service.onnx_graph.inspect import ModelInfo, TensorSpec


@dataclass(frozen=True)
class BuildRequest:
    model_id: str
    precision: Precision
    backend: str = "auto"
    calibration_set_id: str | None = None
    eval_set_id: str | None = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    keep: tuple[str, ...] = ()
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)


def check_shapes(shapes: Mapping[str, ShapeRange], inputs: Sequence[TensorSpec]) -> None:
    """Each range names a model input, has its rank, respects fixed dims, and min <= opt <= max."""
    by_name = {spec.name: spec for spec in inputs}
    for name, shape_range in shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise BadInput(
                f"Shape given for '{name}', which is not a model input; inputs are: {', '.join(by_name)}."
            )
        rank = len(spec.shape)
        for label, dims in (("min", shape_range.min), ("opt", shape_range.opt), ("max", shape_range.max)):
            if len(dims) != rank:
                raise BadInput(
                    f"Input '{name}' has rank {rank} (shape {list(spec.shape)}) but its {label} shape "
                    f"{list(dims)} has rank {len(dims)}."
                )
            if any(d < 1 for d in dims):
                raise BadInput(f"Input '{name}': {label} shape {list(dims)} has a dimension below 1.")
        for axis, model_dim in enumerate(spec.shape):
            lo, mid, hi = shape_range.min[axis], shape_range.opt[axis], shape_range.max[axis]
            if not lo <= mid <= hi:
                raise BadInput(f"Input '{name}' axis {axis}: need min <= opt <= max, got {lo}, {mid}, {hi}.")
            if isinstance(model_dim, int) and (lo, mid, hi) != (model_dim,) * 3:
                raise BadInput(
                    f"Input '{name}' axis {axis} is fixed at {model_dim} in the model, but the shape "
                    f"range asks for {lo}..{hi}."
                )


def build_config_from_request(request: BuildRequest, model: ModelInfo) -> BuildConfig:
    """Validate what does not depend on the backend and produce the canonical config."""
    if request.precision == "int8" and not model.quantization.explicit and request.calibration_set_id is None:
        raise BadInput(
            "precision 'int8' on an FP32 model needs a calibration_set_id (upload one with "
            "POST /v1/calibration-sets), or upload a model that already has Q/DQ nodes."
        )
    if request.precision != "int8" and request.calibration_set_id is not None:
        raise BadInput(f"calibration_set_id only applies to precision 'int8', not '{request.precision}'.")
    check_shapes(request.shapes, model.inputs)
    calibration = (
        request.calibration if request.precision == "int8" and not model.quantization.explicit else None
    )
    # The held-out set can change the engine (method "auto" and sensitivity pick by accuracy on it).
    extra = (("eval_set_id", request.eval_set_id),) if calibration is not None and request.eval_set_id else ()
    return BuildConfig(
        precision=request.precision,
        keep=tuple(sorted(set(request.keep))),
        shapes=tuple(sorted(request.shapes.items())),
        calibration=calibration,
        extra=extra,
    )


def engine_key(request: BuildRequest, config: BuildConfig, backend: BackendInfo) -> EngineKey:
    calibration_set = request.calibration_set_id if config.calibration is not None else None
    return EngineKey(
        model_id=request.model_id, config=config, calibration_set_id=calibration_set, backend=backend
    )
