"""Histograms of absolute activation values: a fine power-of-two grid, filled in one streaming pass.

An ``AbsHistogram`` counts |x| over ``[0, range_max]`` in ``num_bins`` equal bins (the last bin is
closed on the right). ``AbsHistogramAccumulator`` builds one from arrays fed one at a time, never
keeping them, with ``range_max`` the exact max |x| as before, but reading the data once:

* It counts on a fine grid over ``[0, R)``: ``size`` bins, ``size`` the smallest power of two of at
  least ``GRID_BINS_PER_BIN * num_bins`` (65,536 for 2,048 bins), where ``R = 2**k`` is the smallest
  power of two above every |x| seen so far. When a larger value arrives, ``R`` doubles (as often as
  needed) and adjacent bin pairs are summed. Fine bin ``j`` at range ``R`` holds the values with
  ``floor(|x| * size / R) == j``; with ``size`` and ``R`` powers of two that product is exact in
  binary floating point, and ``floor(floor(y) / 2) == floor(y / 2)``, so the merged counts equal
  direct binning over the final ``R``: a pure function of the multiset of values, whatever their
  order or how they are split into arrays. No value can ever fall outside the range.
* ``result()`` re-bins the grid to ``num_bins`` bins over ``[0, max |x|]``: the cumulative count at
  each result edge is interpolated linearly inside the fine bin the edge falls in and rounded. As
  the max is at least ``R / 2``, a result bin spans at least 16 fine bins, so each edge misplaces at
  most half of one fine bin's count (about 1/32 of a result bin's worth near that edge).

Why re-bin instead of returning the grid trimmed to the max (2,049 to 4,096 bins of width ``R /
4096``): the entropy search is sensitive to the bin layout. On the PP-OCR detector's 81 tensors
(whole activations, 6 photos at 320x320), entropy thresholds from trimmed 4,096-bin grids were
within 1 % of those from exact 2,048 bins over ``[0, max]`` for 67 % of the tensors (worst ratio
0.16); re-binned from an 8,192 / 32,768 / 65,536-bin grid, for 80 / 93 / 96 % (worst 0.88 / 0.84 /
0.96, all within 5 % at 65,536). ``max`` and ``percentile`` agreed either way. The grid costs
512 KiB per tensor.

This replaces a design that read the data twice (exact max first, then counts over ``[0, max]``):
it needs one pass over the calibration data instead of two, and it cannot fail when ONNX Runtime
gives slightly different activations on a second run (it promises no bit-identical results across
runs or batch sizes; a value 1e-6 above the first pass's max used to abort the build).

``observe_max`` lets a caller report a maximum measured elsewhere (an exact in-graph ReduceMax while
only a subsample of the values is counted); it widens the range as a counted value would. Non-finite
values (NaN, inf) are rejected: they mean the model or the data is broken, and a threshold computed
while silently ignoring them would hide that.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from service.errors import InvalidCalibrationSet

# Bins over [0, max |x|] in a result (TensorRT's entropy calibrator uses 2048).
DEFAULT_NUM_BINS = 2048
# Fine grid bins per result bin, at least (module docstring).
GRID_BINS_PER_BIN = 32
# Elements binned per step: bounds the temporaries (|x| in float32, int32 bin indices, bincount's
# intp copy) to about 16 MB however large one activation tensor is.
_CHUNK_ELEMENTS = 1 << 20
# float32 multiplies by 2**e exactly only while the factor is a normal float32.
_FLOAT32_EXPONENTS = range(-126, 128)


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
    """Streams arrays into an ``AbsHistogram`` whose range grows by powers of two (module docstring)."""

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, *, name: str = "tensor") -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be at least 1, got {num_bins}.")
        self._name = name
        self._num_bins = num_bins
        # A power of two: bins per unit (grid size / R) is then a power of two too.
        self._grid = np.zeros(1 << (GRID_BINS_PER_BIN * num_bins - 1).bit_length(), dtype=np.int64)
        self._log2_size = self._grid.size.bit_length() - 1
        # log2 of R: every value counted so far is below 2**exponent. None until a non-zero value
        # arrives; zeros land in bin 0 at every range.
        self._exponent: int | None = None
        self._observed_max = 0.0
        self._count = 0

    @property
    def observed_max(self) -> float:
        return self._observed_max

    def update(self, values: np.ndarray) -> None:
        """Count the absolute values of ``values`` (any shape; float16/32/64)."""
        flat = _as_float_vector(values, self._name)
        for start in range(0, flat.size, _CHUNK_ELEMENTS):
            self._update_chunk(flat[start : start + _CHUNK_ELEMENTS])

    def observe_max(self, peak: float) -> None:
        """Take ``peak`` as a value seen but not counted: the range and ``observed_max`` cover it."""
        if not math.isfinite(peak):
            raise _non_finite(self._name)
        self._grow_to(abs(float(peak)))

    def result(self) -> AbsHistogram:
        """``num_bins`` bins over ``[0, observed_max]``, re-binned from the grid (module docstring)."""
        if self._exponent is None:
            counts = np.zeros(self._num_bins, dtype=np.int64)
            counts[0] = self._grid[0]
            return AbsHistogram(counts=counts, range_max=0.0, observed_max=0.0, count=self._count)
        width = math.ldexp(1.0, self._exponent - self._log2_size)
        last = min(int(self._observed_max / width), self._grid.size - 1)
        cumulative = np.concatenate(([0], np.cumsum(self._grid[: last + 1]))).astype(np.float64)
        edges = np.arange(self._num_bins + 1, dtype=np.float64) * (self._observed_max / self._num_bins)
        at_edges = np.rint(np.interp(edges, np.arange(last + 2, dtype=np.float64) * width, cumulative))
        at_edges[-1] = cumulative[-1]  # every value is <= observed_max: the last bin takes the rest
        return AbsHistogram(
            counts=np.diff(at_edges.astype(np.int64)),
            range_max=self._observed_max,
            observed_max=self._observed_max,
            count=self._count,
        )

    def _update_chunk(self, chunk: np.ndarray) -> None:
        magnitudes = np.abs(chunk)
        chunk_max = float(magnitudes.max()) if magnitudes.size else 0.0
        if not math.isfinite(chunk_max):
            raise _non_finite(self._name)
        self._grow_to(chunk_max)
        self._count += int(magnitudes.size)
        if self._exponent is None:  # all zeros so far
            self._grid[0] += magnitudes.size
            return
        # bins per unit = grid size / R = 2**(log2(size) - exponent): multiplying by it is exact.
        scale_exponent = self._log2_size - self._exponent
        if magnitudes.dtype != np.float32 or scale_exponent not in _FLOAT32_EXPONENTS:
            magnitudes = magnitudes.astype(np.float64)
        np.multiply(magnitudes, math.ldexp(1.0, scale_exponent), out=magnitudes)
        indices = magnitudes.astype(np.intp)  # bincount converts anything else to intp first
        del magnitudes
        self._grid += np.bincount(indices, minlength=self._grid.size)

    def _grow_to(self, peak: float) -> None:
        if peak > self._observed_max:
            self._observed_max = peak
        if peak == 0.0:
            return
        # frexp: peak = m * 2**e with 0.5 <= m < 1, so 2**e is the smallest power of two above peak.
        needed = math.frexp(peak)[1]
        if self._exponent is None:
            self._exponent = needed
        elif needed > self._exponent:
            # After log2(size) merges everything sits in bin 0; further ones would change nothing.
            for _ in range(min(needed - self._exponent, self._log2_size)):
                pairs = self._grid.reshape(-1, 2).sum(axis=1)
                self._grid[: pairs.size] = pairs
                self._grid[pairs.size :] = 0
            self._exponent = needed


def max_abs(values: np.ndarray, *, name: str = "tensor") -> float:
    """The largest |x| in ``values`` (0.0 for an empty array); rejects NaN and inf."""
    flat = _as_float_vector(values, name)
    if flat.size == 0:
        return 0.0
    # max and -min avoid materialising |x|: no temporary as large as the activation.
    peak = max(float(flat.max()), -float(flat.min()))
    if not math.isfinite(peak):  # numpy's max and min propagate NaN
        raise _non_finite(name)
    return peak


def abs_histogram_from_arrays(
    arrays: Iterable[np.ndarray], *, num_bins: int = DEFAULT_NUM_BINS, name: str = "tensor"
) -> AbsHistogram:
    """Histogram of |x| over all ``arrays`` in one pass (any iterable, read once)."""
    accumulator = AbsHistogramAccumulator(num_bins, name=name)
    for array in arrays:
        accumulator.update(array)
    return accumulator.result()


def _non_finite(name: str) -> InvalidCalibrationSet:
    return InvalidCalibrationSet(
        f"Tensor '{name}' produced NaN or infinite values on the calibration data; "
        "check the calibration inputs (scaling, dtype) and that the model runs correctly in FP32."
    )


def _as_float_vector(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype not in (np.float32, np.float64):
        raise InvalidCalibrationSet(
            f"Tensor '{name}' has dtype {array.dtype}; only floating-point tensors can be calibrated."
        )
    return array.reshape(-1)
