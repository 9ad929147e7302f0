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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.backends.base import IOSpec, ShapeRange
from service.errors import BadInput


@dataclass(frozen=True)
class TensorBudget:
    """Bytes one input tensor (ENGINE_SERVICE_MAX_INPUT_TENSOR_BYTES) and all inputs of one benchmark
    call (ENGINE_SERVICE_MAX_BENCHMARK_INPUT_BYTES) may take; None leaves a bound off."""

    one_input: int | None = None
    all_inputs: int | None = None

    def check_input(self, name: str, shape: Sequence[int], nbytes: int) -> None:
        """BadInput naming the setting when one input is over its bound."""
        if self.one_input is not None and nbytes > self.one_input:
            raise BadInput(
                f"input '{name}' of shape {list(shape)} takes {nbytes} bytes, over the limit of "
                f"{self.one_input} bytes for one input tensor; use a smaller batch or shape, or raise "
                "ENGINE_SERVICE_MAX_INPUT_TENSOR_BYTES.",
                details={"limit": "max_input_tensor_bytes", "limit_bytes": self.one_input},
            )

    def check_total(self, batch_size: int, nbytes: int) -> None:
        """BadInput naming the setting when a benchmark batch's inputs together are over their bound."""
        if self.all_inputs is not None and nbytes > self.all_inputs:
            raise BadInput(
                f"the inputs of a batch of {batch_size} take {nbytes} bytes, over the limit of "
                f"{self.all_inputs} bytes for one benchmark call; use smaller batch sizes, or raise "
                "ENGINE_SERVICE_MAX_BENCHMARK_INPUT_BYTES.",
                details={"limit": "max_benchmark_input_bytes", "limit_bytes": self.all_inputs},
            )


UNBOUNDED_TENSORS = TensorBudget()


def check_feed_sizes(
    specs: Sequence[IOSpec],
    batch_sizes: Sequence[int],
    *,
    shapes: Mapping[str, ShapeRange] | None = None,
    sizes: Mapping[str, Sequence[int]] | None = None,
    budget: TensorBudget,
) -> None:
    """Refuse (BadInput naming the setting) batch sizes whose synthetic inputs would be over ``budget``.

    Batches the engine cannot take at all are left to the benchmark, which reports them as skipped.
    """
    for batch_size in batch_sizes:
        total = 0
        for spec in specs:
            try:
                shape = _concrete_shape(
                    spec, batch_size, (shapes or {}).get(spec.name), (sizes or {}).get(spec.name)
                )
            except BadInput:
                continue
            nbytes = math.prod(shape) * np.dtype(spec.dtype).itemsize
            budget.check_input(spec.name, shape, nbytes)
            total += nbytes
        budget.check_total(batch_size, total)


def synthetic_feeds(
    specs: Sequence[IOSpec],
    batch_size: int,
    *,
    shapes: Mapping[str, ShapeRange] | None = None,
    sizes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    budget: TensorBudget = UNBOUNDED_TENSORS,
) -> dict[str, np.ndarray]:
    """Seeded inputs of ``batch_size``; BadInput naming the input and axis when the engine cannot take it,
    or naming the setting when the inputs would be over ``budget`` (checked before allocating)."""
    check_feed_sizes(specs, [batch_size], shapes=shapes, sizes=sizes, budget=budget)
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
