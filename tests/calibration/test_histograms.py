"""|x| histograms from a power-of-two grid: counts, order independence, rejection of bad values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.calibration import histograms
from service.calibration.histograms import (
    AbsHistogram,
    AbsHistogramAccumulator,
    abs_histogram_from_arrays,
    max_abs,
)
from service.errors import InvalidCalibrationSet


def _normal(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def _grid_counts(values: np.ndarray, size: int) -> np.ndarray:
    """Direct binning of |values| over the final power-of-two range in ``size`` bins."""
    magnitudes = np.abs(values.astype(np.float64))
    top = 2.0 ** np.frexp(magnitudes.max())[1]
    return np.bincount((magnitudes * size / top).astype(np.int64), minlength=size)


def test_histogram_counts_every_element_once_and_records_the_exact_max() -> None:
    values = _normal(10_000)
    hist = abs_histogram_from_arrays([values], num_bins=256)
    assert hist.count == values.size
    assert int(hist.counts.sum()) == values.size
    assert hist.observed_max == float(np.abs(values).max())
    assert hist.range_max == hist.observed_max
    assert hist.num_bins == 256


def test_histogram_bins_agree_with_numpy_histogram_within_one_grid_bin_per_edge() -> None:
    values = _normal(50_000, seed=3)
    hist = abs_histogram_from_arrays([values], num_bins=2048)
    expected, _ = np.histogram(np.abs(values), bins=2048, range=(0.0, hist.range_max))
    # Each edge may misplace up to half of the grid bin it falls in; the fullest one bounds that.
    misplaced = np.abs(np.cumsum(hist.counts) - np.cumsum(expected)).max()
    assert misplaced <= _grid_counts(values, 65_536).max()
    assert np.abs(hist.counts - expected).sum() < 0.02 * values.size  # ~24 values a bin here


def test_the_largest_value_lands_in_the_last_bin() -> None:
    values = np.array([0.0, 0.25, -1.0, 1.0], dtype=np.float32)
    hist = abs_histogram_from_arrays([values], num_bins=4)
    np.testing.assert_array_equal(hist.counts, [1, 1, 0, 2])
    assert hist.range_max == 1.0


def test_a_growing_range_merges_grid_bins_exactly_as_direct_binning_would() -> None:
    small = _normal(5_000, seed=7) * np.float32(1e-3)
    large = _normal(5_000, seed=8) * np.float32(1e3)  # 20 doublings later
    accumulator = histograms.AbsHistogramAccumulator(64)
    for part in (small, large):
        accumulator.update(part)
    np.testing.assert_array_equal(accumulator._grid, _grid_counts(np.concatenate([small, large]), 2048))
    assert accumulator.result() == abs_histogram_from_arrays([large, small], num_bins=64)


def test_a_value_above_every_earlier_one_goes_into_the_last_bin_and_never_fails() -> None:
    # Regression: a re-run of ONNX Runtime gave 0.857897 after a maximum of 0.85789, which the
    # fixed-range design rejected as changed data.
    accumulator = AbsHistogramAccumulator(2048, name="/model.22/dfl/Softmax_output_0")
    accumulator.update(np.array([0.1, 0.85789], np.float32))
    accumulator.update(np.array([0.857897], np.float32))
    hist = accumulator.result()
    assert hist.observed_max == hist.range_max == float(np.float32(0.857897))
    assert hist.counts[-1] == 2 and hist.count == 3  # 0.85789 is within the last bin too


def test_a_max_measured_elsewhere_widens_the_range_without_being_counted() -> None:
    accumulator = AbsHistogramAccumulator(16)
    accumulator.update(np.array([0.5, -0.25], np.float32))
    accumulator.observe_max(3.0)
    hist = accumulator.result()
    assert (hist.observed_max, hist.range_max, hist.count) == (3.0, 3.0, 2)
    np.testing.assert_array_equal(np.flatnonzero(hist.counts), [1, 2])  # bins of width 3/16


@settings(max_examples=30, deadline=None, database=None)
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_histogram_ignores_how_values_are_split_into_arrays_and_their_order(
    seed: int, cuts: list[int]
) -> None:
    values = _normal(3000, seed)
    whole = abs_histogram_from_arrays([values], num_bins=512)
    pieces = np.split(values, sorted(cuts))
    rng = np.random.default_rng(seed)
    shuffled = [pieces[i] for i in rng.permutation(len(pieces))]
    assert abs_histogram_from_arrays(shuffled, num_bins=512) == whole


def test_large_arrays_are_binned_in_chunks_with_identical_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    values = _normal(10_001, seed=5)
    whole = abs_histogram_from_arrays([values], num_bins=128)
    monkeypatch.setattr(histograms, "_CHUNK_ELEMENTS", 97)
    assert abs_histogram_from_arrays([values], num_bins=128) == whole


def test_an_all_zero_tensor_fills_the_first_bin() -> None:
    hist = abs_histogram_from_arrays([np.zeros((4, 5), np.float32)], num_bins=16)
    assert hist.range_max == 0.0
    assert hist.counts[0] == 20
    assert int(hist.counts[1:].sum()) == 0


def test_float16_and_float64_values_are_counted_like_float32() -> None:
    values = np.array([0.5, -2.0, 1.25, 0.0], dtype=np.float16)
    as16 = abs_histogram_from_arrays([values], num_bins=8)
    as32 = abs_histogram_from_arrays([values.astype(np.float32)], num_bins=8)
    as64 = abs_histogram_from_arrays([values.astype(np.float64)], num_bins=8)
    assert as16 == as32 == as64


def test_merging_histograms_with_identical_bins_adds_their_counts() -> None:
    a, b = _normal(1000, 1), _normal(1000, 2)
    a[0] = b[0] = 5.0  # the same max, hence the same bins
    left = abs_histogram_from_arrays([a], num_bins=64)
    right = abs_histogram_from_arrays([b], num_bins=64)
    assert left.merge(right) == abs_histogram_from_arrays([a, b], num_bins=64)


def test_merging_histograms_over_different_ranges_is_refused() -> None:
    left = abs_histogram_from_arrays([_normal(100, 1)], num_bins=64)
    right = abs_histogram_from_arrays([_normal(100, 2) * np.float32(10)], num_bins=64)
    with pytest.raises(ValueError, match="identical bins"):
        left.merge(right)


def test_histogram_counts_cannot_be_modified() -> None:
    hist = abs_histogram_from_arrays([_normal(100)], num_bins=8)
    with pytest.raises(ValueError, match="read-only"):
        hist.counts[0] = 5


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected_with_the_tensor_name(bad: float) -> None:
    values = np.array([0.5, bad], dtype=np.float32)
    with pytest.raises(InvalidCalibrationSet, match="'relu_out' produced NaN or infinite values"):
        max_abs(values, name="relu_out")
    with pytest.raises(InvalidCalibrationSet, match="'relu_out' produced NaN or infinite values"):
        AbsHistogramAccumulator(8, name="relu_out").update(values)
    with pytest.raises(InvalidCalibrationSet, match="'relu_out' produced NaN or infinite values"):
        AbsHistogramAccumulator(8, name="relu_out").observe_max(bad)


def test_integer_tensors_cannot_be_calibrated() -> None:
    with pytest.raises(InvalidCalibrationSet, match="'shape' has dtype int64; only floating-point"):
        max_abs(np.arange(4), name="shape")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"counts": np.array([1, 2]), "range_max": 1.0, "observed_max": 2.0, "count": 3}, "observed_max"),
        ({"counts": np.array([1, 2]), "range_max": 1.0, "observed_max": 1.0, "count": 4}, "sum of the bins"),
        ({"counts": np.array([-1, 2]), "range_max": 1.0, "observed_max": 1.0, "count": 1}, "negative"),
        ({"counts": np.array([1]), "range_max": float("nan"), "observed_max": 0.0, "count": 1}, "finite"),
        (
            {"counts": np.array([], np.int64), "range_max": 1.0, "observed_max": 0.0, "count": 0},
            "at least one",
        ),
    ],
)
def test_inconsistent_histograms_cannot_be_constructed(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AbsHistogram(**kwargs)  # type: ignore[arg-type]
