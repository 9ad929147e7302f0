"""Calibration and held-out batches for a model, from stored calibration sets.

Held-out samples come from a separate evaluation set when one is given, else they are drawn at random
from the calibration set with a recorded seed (``holdout_seed``, part of the build config, so a
rebuild draws the same ones); they are never used for calibration. Batches are read lazily from
memory-mapped files, so each pass costs one batch of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.datasets.storage import CalibrationSet
from service.errors import BadInput
from service.onnx_graph.inspect import TensorSpec

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class CalibrationInputs:
    calibration: Batches
    calibration_samples: int
    holdout: Batches | None
    holdout_samples: int
    batch_size: int
    holdout_seed: int | None = None  # None: a separate evaluation set was used


def batch_size_for(inputs: Sequence[TensorSpec], preferred: int = DEFAULT_BATCH_SIZE) -> tuple[int, bool]:
    """The samples per run, and whether the model fixes it (then every batch must be exactly that)."""
    fixed = {spec.shape[0] for spec in inputs if spec.shape and isinstance(spec.shape[0], int)}
    if len(fixed) == 1:
        return int(next(iter(fixed))), True
    return preferred, False


def calibration_inputs(
    model_inputs: Sequence[TensorSpec],
    calibration_set: CalibrationSet,
    binding: Mapping[str, str],
    *,
    eval_set: CalibrationSet | None = None,
    eval_binding: Mapping[str, str] | None = None,
    holdout_fraction: float = 0.1,
    max_samples: int | None = None,
    need_holdout: bool = True,
    holdout_seed: int = 0,
) -> CalibrationInputs:
    batch_size, fixed_batch = batch_size_for(model_inputs)
    seed: int | None = None
    calib_rows: Sequence[int]
    holdout_rows: Sequence[int]
    if eval_set is not None:
        calib_rows = range(calibration_set.samples)
        holdout_set, holdout_rows, holdout_bind = eval_set, range(eval_set.samples), eval_binding or {}
    elif need_holdout and holdout_fraction > 0:
        calib_rows, holdout_rows = calibration_set.random_split(holdout_fraction, holdout_seed)
        holdout_set, holdout_bind, seed = calibration_set, binding, holdout_seed
    else:
        calib_rows, holdout_rows, holdout_set, holdout_bind = range(calibration_set.samples), (), None, {}
    if max_samples is not None:
        calib_rows = calib_rows[:max_samples]
    # A dynamic batch takes a shorter last batch; a fixed one only whole batches.
    usable = (len(calib_rows) // batch_size) * batch_size if fixed_batch else len(calib_rows)
    if usable == 0:
        raise BadInput(
            f"The calibration set leaves {len(calib_rows)} sample(s) for calibration, fewer than one "
            f"batch of {batch_size}; upload more samples or lower holdout_fraction."
        )
    calib_indices = tuple(calib_rows[:usable])

    def calibration() -> Iterable[Mapping[str, np.ndarray]]:
        return calibration_set.batches(batch_size, indices=calib_indices, bind=binding)

    holdout: Batches | None = None
    holdout_usable = (len(holdout_rows) // batch_size) * batch_size if fixed_batch else len(holdout_rows)
    if holdout_set is not None and holdout_usable > 0:
        dataset, rows, bind = holdout_set, tuple(holdout_rows[:holdout_usable]), holdout_bind

        def holdout_batches() -> Iterable[Mapping[str, np.ndarray]]:
            return dataset.batches(batch_size, indices=rows, bind=bind)

        holdout = holdout_batches
    return CalibrationInputs(
        calibration=calibration,
        calibration_samples=usable,
        holdout=holdout,
        holdout_samples=holdout_usable if holdout is not None else 0,
        batch_size=batch_size,
        holdout_seed=seed if holdout is not None else None,
    )
