"""Optimization-profile ranges for a model's inputs, checked against the ONNX graph.

``shape_ranges_for(inputs, requested)`` returns one :class:`ShapeRange` per input that has a dynamic
dimension, and checks every requested range against the model before any builder sees it, so a bad
range fails with a message naming the input and axis instead of a TensorRT log line.

Default for unspecified inputs: an input whose *only* dynamic dimension is the leading (batch) axis
gets batch 1 (min = opt = max = 1). Batch 1 is what the service benchmarks and what most deployments
of a single-image model run; a caller who wants larger batches passes a range. Any other dynamic
dimension (image height/width, sequence length) has no value that would be right for most models,
so the build is refused with the exact ``shapes`` entry to send.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from service.backends.base import ShapeRange
from service.errors import BadInput
from service.onnx_graph.inspect import TensorSpec

DEFAULT_BATCH = 1


def is_dynamic(shape: Sequence[int | str]) -> bool:
    return any(not isinstance(dim, int) or dim < 0 for dim in shape)


def shape_ranges_for(
    inputs: Sequence[TensorSpec], requested: Mapping[str, ShapeRange], *, complete: bool = True
) -> tuple[dict[str, ShapeRange], tuple[str, ...]]:
    """Ranges for every dynamic input (validated), and notes on the defaults that were applied.

    Ranges given for static inputs are validated (they must equal the static shape) but not returned:
    a builder needs profile entries only for dynamic inputs. With ``complete=False`` (runtimes that
    accept any shape, like ONNX Runtime) only the given ranges are checked and returned: no defaults,
    no error for dynamic inputs without one.
    """
    by_name = {spec.name: spec for spec in inputs}
    unknown = sorted(set(requested) - set(by_name))
    if unknown:
        raise BadInput(
            f"Shapes were given for {unknown}, which are not inputs of the model; its inputs are "
            f"{sorted(by_name)}."
        )
    ranges: dict[str, ShapeRange] = {}
    notes: list[str] = []
    for spec in inputs:
        given = requested.get(spec.name)
        if given is not None:
            check_range(spec, given)
            if is_dynamic(spec.shape):
                ranges[spec.name] = given
            continue
        if not is_dynamic(spec.shape) or not complete:
            continue
        default = _batch_default(spec)
        if default is None:
            raise BadInput(_missing_range_message(spec))
        ranges[spec.name] = default
        notes.append(
            f"input '{spec.name}' {list(spec.shape)}: no shape range given for its dynamic batch axis; "
            f"the engine is built for batch {DEFAULT_BATCH} (pass shapes to build for other batch sizes)"
        )
    return ranges, tuple(notes)


def check_range(spec: TensorSpec, shape_range: ShapeRange) -> None:
    """Raise BadInput unless ``shape_range`` fits the input's rank, static dims and min <= opt <= max."""
    rank = len(spec.shape)
    for label, dims in (("min", shape_range.min), ("opt", shape_range.opt), ("max", shape_range.max)):
        if len(dims) != rank:
            raise BadInput(
                f"Input '{spec.name}' has rank {rank} (shape {list(spec.shape)}), but its {label} shape "
                f"{list(dims)} has {len(dims)} dimensions."
            )
        if any(dim < 1 for dim in dims):
            raise BadInput(
                f"Input '{spec.name}': every dimension of the {label} shape {list(dims)} must be >= 1."
            )
    for axis, model_dim in enumerate(spec.shape):
        lo, mid, hi = shape_range.min[axis], shape_range.opt[axis], shape_range.max[axis]
        if isinstance(model_dim, int) and model_dim >= 0 and not lo == mid == hi == model_dim:
            raise BadInput(
                f"Input '{spec.name}' axis {axis} is fixed at {model_dim} in the model, but the shape "
                f"range asks for min/opt/max {lo}/{mid}/{hi}; use {model_dim} for all three."
            )
        if not lo <= mid <= hi:
            raise BadInput(
                f"Input '{spec.name}' axis {axis}: the range must satisfy min <= opt <= max, "
                f"got {lo}/{mid}/{hi}."
            )


def _batch_default(spec: TensorSpec) -> ShapeRange | None:
    dynamic_axes = [axis for axis, dim in enumerate(spec.shape) if not isinstance(dim, int) or dim < 0]
    if dynamic_axes != [0]:
        return None
    dims = (DEFAULT_BATCH, *(int(dim) for dim in spec.shape[1:]))
    return ShapeRange(min=dims, opt=dims, max=dims)


def _missing_range_message(spec: TensorSpec) -> str:
    dynamic_axes = [axis for axis, dim in enumerate(spec.shape) if not isinstance(dim, int) or dim < 0]
    example = [
        dim if isinstance(dim, int) and dim >= 0 else (1 if axis == 0 else 224)
        for axis, dim in enumerate(spec.shape)
    ]
    hint = json.dumps({spec.name: {"min": example, "opt": example, "max": example}})
    return (
        f"Input '{spec.name}' has dynamic dimensions {list(spec.shape)} (axes {dynamic_axes}) and no shape "
        f'range was given; an engine needs concrete bounds. Pass shapes, e.g. "shapes": {hint} '
        "(replace the example values with the sizes you will run)."
    )
