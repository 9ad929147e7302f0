"""Synthetic benchmark inputs for a runner's input specs, at a requested batch size.

Axis 0 is the batch axis. Other dynamic dims take the size the benchmark chose for them (``sizes``:
full shapes per input, see :mod:`service.reports.benchmark_shapes`), else the engine's
optimization-profile ``opt`` value, or the build's shape range when the runner reports no profile;
when none gives a size, or the engine
cannot take the batch size (fixed batch, outside its profile), :func:`synthetic_feeds` raises
BadInput naming the input and axis, which the benchmark reports as a skipped batch size. Values are
seeded normal floats, zeros for integer and bool inputs (always valid as indices or masks), uniform
bytes for ``uint8``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.backends.base import IOSpec, ShapeRange
from service.errors import BadInput


def synthetic_feeds(
    specs: Sequence[IOSpec],
    batch_size: int,
    *,
    shapes: Mapping[str, ShapeRange] | None = None,
    sizes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded inputs of ``batch_size``; BadInput naming the input and axis when the engine cannot take it."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = _concrete_shape(spec, batch_size, (shapes or {}).get(spec.name), (sizes or {}).get(spec.name))
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.uint8:
            feeds[spec.name] = rng.integers(0, 256, size=shape, dtype=np.uint8)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _concrete_shape(
    spec: IOSpec, batch_size: int, given: ShapeRange | None, size: Sequence[int] | None
) -> tuple[int, ...]:
    profile = spec.profile or given
    if size is not None and len(size) != len(spec.shape):
        size = None  # chosen for the model's rank; an engine of another rank keeps its own sizes
    dims: list[int] = []
    for axis, dim in enumerate(spec.shape):
        fixed = isinstance(dim, int) and dim >= 0
        if axis == 0:
            if fixed and dim != batch_size:
                raise BadInput(f"input '{spec.name}' has a fixed batch of {dim}")
            if not fixed and profile is not None and not profile.min[0] <= batch_size <= profile.max[0]:
                raise BadInput(
                    f"input '{spec.name}' takes batches {profile.min[0]}..{profile.max[0]} "
                    "(its optimization profile)"
                )
            dims.append(batch_size)
        elif fixed:
            dims.append(int(dim))
        elif size is not None:
            dims.append(int(size[axis]))
        elif profile is not None:
            dims.append(int(profile.opt[axis]))
        else:
            raise BadInput(
                f"input '{spec.name}' axis {axis} is dynamic ('{dim}') and neither the engine nor its build "
                "gives a size to benchmark with; build the engine with a shape range for it"
            )
    return tuple(dims)
