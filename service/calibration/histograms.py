"""Fixed-range histograms of absolute activation values.

An ``AbsHistogram`` counts |x| over ``[0, range_max]`` in ``num_bins`` equal bins (the last bin is
closed on the right, so ``range_max`` itself lands in it). Calibration fixes ``range_max`` to the exact
max |x| over the whole calibration set before any counting starts (see ``service.calibration.collect``),
so every element's bin depends only on its own value: the histogram, and every threshold computed
from it, is a pure function of the multiset of samples, whatever the batch size or sample order.

``AbsHistogramAccumulator`` is the streaming half: it is fed one array at a time and never keeps the
arrays. Non-finite values (NaN, inf) are rejected: they mean the model or the data is broken, and a
threshold computed while silently ignoring them would hide that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidCalibrationSet

DEFAULT_NUM_BINS = 2048
# Elements binned per step: bounds the temporaries (|x| and bin indices) to a few tens of MB
# however large one activation tensor is.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class AbsHistogram:
    """Counts of |x| in ``len(counts)`` equal bins over ``[0, range_max]``.

    ``observed_max`` is the largest |x| counted (never above ``range_max``); ``count`` is the number
    of elements counted. The counts array is read-only.
    """

    counts: np.ndarray
    range_max: float
    observed_max: float
    count: int

    def __post_init__(self) -> None:
        counts = np.array(self.counts, dtype=np.int64, copy=True)
        if counts.ndim != 1 or counts.size < 1:
            raise ValueError("A histogram needs a one-dimensional array of at least one bin count.")
        if (counts < 0).any():
            raise ValueError("Histogram counts cannot be negative.")
        if not (math.isfinite(self.range_max) and self.range_max >= 0.0):
            raise ValueError(f"range_max must be finite and >= 0, got {self.range_max!r}.")
        if not (0.0 <= self.observed_max <= self.range_max):
            raise ValueError(
                f"observed_max {self.observed_max!r} must lie in [0, range_max={self.range_max!r}]."
            )
        if int(counts.sum()) != self.count:
            raise ValueError(f"count {self.count} differs from the sum of the bins {int(counts.sum())}.")
        counts.flags.writeable = False
        object.__setattr__(self, "counts", counts)

    @property
    def num_bins(self) -> int:
        return int(self.counts.size)

    @property
    def bin_width(self) -> float:
        return self.range_max / self.num_bins

    def edges(self) -> np.ndarray:
        """The ``num_bins + 1`` bin edges, from 0 to ``range_max``."""
        return np.arange(self.num_bins + 1, dtype=np.float64) * self.bin_width

    def is_empty(self) -> bool:
        return self.count == 0

    def same_bins(self, other: AbsHistogram) -> bool:
        return self.num_bins == other.num_bins and self.range_max == other.range_max

    def merge(self, other: AbsHistogram) -> AbsHistogram:
        """Sum of two histograms with identical bins (same count and range).

        Histograms over different ranges cannot be merged without re-binning, which would make the
        result depend on the merge order; collect both with the same range instead.
        """
        if not self.same_bins(other):
            raise ValueError(
                "Only histograms with identical bins can be merged: "
                f"{self.num_bins} bins over [0, {self.range_max}] vs "
                f"{other.num_bins} bins over [0, {other.range_max}]."
            )
        return AbsHistogram(
            counts=self.counts + other.counts,
            range_max=self.range_max,
            observed_max=max(self.observed_max, other.observed_max),
            count=self.count + other.count,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AbsHistogram):
            return NotImplemented
        return (
            self.same_bins(other)
            and self.observed_max == other.observed_max
            and self.count == other.count
            and bool(np.array_equal(self.counts, other.counts))
        )


class AbsHistogramAccumulator:
    """Streams arrays into an ``AbsHistogram`` over a range fixed up front.

    Values above ``range_max`` are an error, not clipped: with the two-pass design the range is the
    exact maximum of the same data, so a larger value means the data changed between passes.
    """

    def __init__(self, range_max: float, num_bins: int = DEFAULT_NUM_BINS, *, name: str = "tensor") -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be at least 1, got {num_bins}.")
        if not (math.isfinite(range_max) and range_max >= 0.0):
            raise ValueError(f"range_max must be finite and >= 0, got {range_max!r}.")
        self._name = name
        self._range_max = float(range_max)
        self._counts = np.zeros(num_bins, dtype=np.int64)
        self._observed_max = 0.0
        self._count = 0
        # float64 scale factor: the same element always maps to the same bin, whatever array it
        # arrives in, because the computation is elementwise.
        self._bins_per_unit = num_bins / self._range_max if self._range_max > 0.0 else 0.0

    def update(self, values: np.ndarray) -> None:
        """Count the absolute values of ``values`` (any shape; float16/32/64)."""
        flat = _as_float_vector(values, self._name)
        for start in range(0, flat.size, _CHUNK_ELEMENTS):
            self._update_chunk(flat[start : start + _CHUNK_ELEMENTS])

    def _update_chunk(self, chunk: np.ndarray) -> None:
        magnitudes = np.abs(chunk)
        chunk_max = float(magnitudes.max()) if magnitudes.size else 0.0
        if not math.isfinite(chunk_max):
            raise InvalidCalibrationSet(
                f"Tensor '{self._name}' produced NaN or infinite values on the calibration data; "
                "check the calibration inputs (scaling, dtype) and that the model runs correctly in FP32."
            )
        if chunk_max > self._range_max:
            raise InvalidCalibrationSet(
                f"Tensor '{self._name}' reached |x| = {chunk_max:g} on the second calibration pass, above "
                f"the maximum {self._range_max:g} seen on the first pass: the calibration data must "
                "yield the same samples every time it is read."
            )
        if self._bins_per_unit == 0.0:
            self._counts[0] += magnitudes.size
        else:
            scaled = magnitudes.astype(np.float64) * self._bins_per_unit
            indices = np.minimum(scaled.astype(np.int64), self._counts.size - 1)
            self._counts += np.bincount(indices, minlength=self._counts.size)
        self._observed_max = max(self._observed_max, chunk_max)
        self._count += int(magnitudes.size)

    def result(self) -> AbsHistogram:
        return AbsHistogram(
            counts=self._counts.copy(),
            range_max=self._range_max,
            observed_max=self._observed_max,
            count=self._count,
        )


def max_abs(values: np.ndarray, *, name: str = "tensor") -> float:
    """The largest |x| in ``values`` (0.0 for an empty array); rejects NaN and inf."""
    flat = _as_float_vector(values, name)
    if flat.size == 0:
        return 0.0
    # max and -min avoid materialising |x|: no temporary as large as the activation.
    peak = max(float(flat.max()), -float(flat.min()))
    if not math.isfinite(peak):
        raise InvalidCalibrationSet(
            f"Tensor '{name}' produced NaN or infinite values on the calibration data; "
            "check the calibration inputs (scaling, dtype) and that the model runs correctly in FP32."
        )
    return peak


def abs_histogram_from_arrays(
    arrays: Iterable[np.ndarray],
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    range_max: float | None = None,
    name: str = "tensor",
) -> AbsHistogram:
    """Histogram of |x| over all ``arrays``; the range defaults to their exact max |x|.

    Without ``range_max`` the arrays are read twice (max first, then counts), so pass a sequence,
    not a one-shot iterator.
    """
    if range_max is None:
        arrays = list(arrays)
        range_max = max((max_abs(a, name=name) for a in arrays), default=0.0)
    accumulator = AbsHistogramAccumulator(range_max, num_bins, name=name)
    for array in arrays:
        accumulator.update(array)
    return accumulator.result()


def _as_float_vector(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype not in (np.float32, np.float64):
        raise InvalidCalibrationSet(
            f"Tensor '{name}' has dtype {array.dtype}; only floating-point tensors can be calibrated."
        )
    return array.reshape(-1)
