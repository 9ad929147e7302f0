"""The input shapes a benchmark runs with, chosen before its job starts.

An engine whose inputs have dynamic axes besides the batch axis (a YOLO export with dynamic height and
width) cannot be timed until every such axis has a size. :func:`benchmark_shapes` gives each one, for
each input, from the first of:

1. the request's ``shapes`` (``{"images": [1, 3, 640, 640]}``; the CLI's ``--shape images=1x3x640x640``),
   the batch axis being replaced by each benchmarked batch size;
2. the engine's build shape range (its ``opt`` dims: the size the engine was optimized for);
3. the engine's calibration set (its per-sample shape: the size the engine was calibrated on).

An axis none of them sizes makes :func:`benchmark_shapes` raise BadInput (400) naming every such input
and axis and how to give them, so a benchmark never starts that could only skip every batch size. The
result maps each input with dynamic non-batch axes to a full shape (batch axis 1), and is stored in the
benchmark's config so the report says what was measured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from service.backends.base import ShapeRange
from service.errors import BadInput
from service.onnx_graph.inspect import TensorSpec

# Largest sample (all axes but the batch axis) a benchmark may synthesize: 64 Mi elements, 256 MiB as
# float32, far above any vision input, low enough that a typo cannot exhaust the host's memory.
MAX_SAMPLE_ELEMENTS = 64 * 1024 * 1024


def _dynamic(dim: int | str) -> bool:
    return not (isinstance(dim, int) and dim >= 0)


def benchmark_shapes(
    inputs: Sequence[TensorSpec],
    requested: Mapping[str, Sequence[int]],
    *,
    build_shapes: Mapping[str, ShapeRange],
    calibration_shapes: Mapping[str, Sequence[int]],
    engine_id: str,
) -> dict[str, tuple[int, ...]]:
    """Full shapes for the inputs with dynamic non-batch axes (see the module docstring)."""
    by_name = {spec.name: spec for spec in inputs}
    unknown = sorted(set(requested) - set(by_name))
    if unknown:
        raise BadInput(
            f"shapes names {', '.join(repr(n) for n in unknown)}, which engine {engine_id} does not take; "
            f"its inputs are {', '.join(repr(n) for n in by_name)}."
        )
    resolved: dict[str, tuple[int, ...]] = {}
    missing: list[str] = []
    for spec in inputs:
        given = requested.get(spec.name)
        if given is not None:
            resolved[spec.name] = _checked(spec, given)
            continue
        dynamic_axes = [axis for axis, dim in enumerate(spec.shape) if axis > 0 and _dynamic(dim)]
        if not dynamic_axes:
            continue
        dims = _from_sources(spec, build_shapes.get(spec.name), calibration_shapes.get(spec.name))
        if dims is None:
            missing.append(
                f"input '{spec.name}' axis "
                + ", ".join(f"{axis} ('{spec.shape[axis]}')" for axis in dynamic_axes)
            )
            continue
        resolved[spec.name] = dims
    if missing:
        example = {
            spec.name: [1, *(d if not _dynamic(d) else 640 for d in spec.shape[1:])]
            for spec in inputs
            if any(_dynamic(d) for d in spec.shape[1:])
        }
        raise BadInput(
            f"Engine {engine_id} has dynamic axes that nothing gives a size to benchmark with: "
            f'{"; ".join(missing)}. Give the shape per input, e.g. "shapes": {json.dumps(example)} '
            f"(CLI: --shape NAME=1x3x640x640), or build the engine with a shape range or an INT8 "
            "calibration set of that size.",
            details={"dynamic_axes": missing},
        )
    return resolved


def _checked(spec: TensorSpec, given: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(int(d) for d in given)
    if len(dims) != len(spec.shape):
        raise BadInput(
            f"shapes['{spec.name}'] has {len(dims)} dims, but input '{spec.name}' has {len(spec.shape)} "
            f"({list(spec.shape)})."
        )
    for axis, (dim, expected) in enumerate(zip(dims, spec.shape, strict=True)):
        if dim < 1:
            raise BadInput(f"shapes['{spec.name}'] axis {axis} is {dim}; sizes must be at least 1.")
        if axis > 0 and not _dynamic(expected) and dim != expected:
            raise BadInput(
                f"shapes['{spec.name}'] axis {axis} is {dim}, but input '{spec.name}' is fixed at "
                f"{expected} there ({list(spec.shape)})."
            )
    elements = 1
    for dim in dims[1:]:
        elements *= dim
    if elements > MAX_SAMPLE_ELEMENTS:
        raise BadInput(
            f"shapes['{spec.name}'] {list(dims)} makes samples of {elements} elements, over the limit of "
            f"{MAX_SAMPLE_ELEMENTS}; benchmark at the size the model is used at."
        )
    return dims


def _from_sources(
    spec: TensorSpec, build: ShapeRange | None, calibration: Sequence[int] | None
) -> tuple[int, ...] | None:
    """The build range's ``opt`` dims, else 1 + the calibration sample shape, when they fit the input."""
    if build is not None and len(build.opt) == len(spec.shape):
        return (1, *build.opt[1:])
    if calibration is not None and len(calibration) + 1 == len(spec.shape):
        candidate = (1, *(int(d) for d in calibration))
        fits = all(_dynamic(s) or s == c for s, c in zip(spec.shape[1:], candidate[1:], strict=True))
        return candidate if fits else None
    return None
