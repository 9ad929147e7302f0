"""Thresholds from histograms: the entropy search against a direct loop, and every method's contract."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.calibration.algorithms import (
    CALIBRATION_METHODS,
    FALLBACK_AMAX,
    MIN_AMAX,
    entropy_divergences,
    scale_from_threshold,
    threshold_from_histogram,
    thresholds_from_histograms,
)
from service.calibration.histograms import AbsHistogram, abs_histogram_from_arrays
from service.errors import BadInput


def _direct_divergences(counts: np.ndarray, num_quantized_bins: int) -> np.ndarray:
    """The GTC 2017 loop, written plainly: one reference P and candidate Q per candidate i."""
    bins = counts.astype(np.float64)
    bins[0] = bins[1]
    out = []
    for i in range(num_quantized_bins, bins.size + 1):
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        groups = (np.arange(i) * num_quantized_bins) // i
        nonempty = bins[:i] > 0
        group_sums = np.bincount(groups, weights=bins[:i], minlength=num_quantized_bins)
        group_sizes = np.bincount(groups, weights=nonempty, minlength=num_quantized_bins)
        q = np.where(nonempty, group_sums[groups] / np.maximum(group_sizes[groups], 1), 0.0)
        if q.sum() == 0 or ((p > 0) & (q == 0)).any():
            out.append(math.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        mask = p > 0
        out.append(float((p[mask] * np.log(p[mask] / q[mask])).sum()))
    return np.array(out)


def _relu_normal(n: int, seed: int, sigma: float = 1.0) -> np.ndarray:
    return np.maximum(np.random.default_rng(seed).standard_normal(n) * sigma, 0).astype(np.float32)


def _quantization_mse(values: np.ndarray, amax: float) -> float:
    step = amax / 127
    quantized = np.clip(np.rint(values / step), -127, 127) * step
    return float(np.mean((quantized - values) ** 2))


@pytest.mark.parametrize(
    "values",
    [
        _relu_normal(200_000, 0, sigma=2.0),
        np.random.default_rng(1).laplace(size=100_000).astype(np.float32),
        np.random.default_rng(2).standard_normal(5_000).astype(np.float32),  # sparse tail, inf candidates
    ],
    ids=["relu-normal", "laplace", "sparse-normal"],
)
def test_vectorised_divergences_match_a_direct_loop_over_candidates(values: np.ndarray) -> None:
    hist = abs_histogram_from_arrays([values])
    fast = entropy_divergences(hist)
    direct = _direct_divergences(hist.counts, 128)
    np.testing.assert_array_equal(np.isinf(fast), np.isinf(direct))
    finite = np.isfinite(direct)
    np.testing.assert_allclose(fast[finite], direct[finite], rtol=0, atol=1e-10)
    assert int(np.argmin(fast)) == int(np.argmin(direct))


def test_entropy_threshold_is_the_edge_of_the_least_divergent_candidate() -> None:
    hist = abs_histogram_from_arrays([np.random.default_rng(4).laplace(size=50_000).astype(np.float32)])
    divergences = _direct_divergences(hist.counts, 128)
    expected = (128 + int(np.argmin(divergences))) * hist.bin_width
    assert threshold_from_histogram(hist, "entropy") == pytest.approx(expected, rel=1e-12)


def test_entropy_threshold_ignores_sample_order_and_batching() -> None:
    values = np.random.default_rng(5).laplace(size=40_000).astype(np.float32)
    reference = threshold_from_histogram(abs_histogram_from_arrays([values]), "entropy")
    shuffled = np.random.default_rng(6).permutation(values)
    for batch in (1_000, 7_777, 40_000):
        pieces = [shuffled[i : i + batch] for i in range(0, shuffled.size, batch)]
        assert threshold_from_histogram(abs_histogram_from_arrays(pieces), "entropy") == reference


def test_entropy_clips_a_handful_of_far_outliers() -> None:
    values = np.concatenate([_relu_normal(100_000, 7), np.full(5, 60.0, np.float32)])
    amax = threshold_from_histogram(abs_histogram_from_arrays([values]), "entropy")
    assert 2.0 < amax < 10.0  # the bulk ends near 4.5 sigma; max is 60


def test_entropy_keeps_nearly_the_whole_range_of_uniform_data() -> None:
    values = np.random.default_rng(8).uniform(-1, 1, 200_000).astype(np.float32)
    hist = abs_histogram_from_arrays([values])
    assert threshold_from_histogram(hist, "entropy") >= 0.95 * hist.observed_max


def test_max_method_returns_the_largest_magnitude() -> None:
    values = np.array([0.1, -3.5, 2.0], np.float32)
    assert threshold_from_histogram(abs_histogram_from_arrays([values]), "max") == pytest.approx(3.5)


@pytest.mark.parametrize("percentile", [50.0, 99.0, 99.99])
def test_percentile_threshold_covers_the_requested_share_to_within_one_bin(percentile: float) -> None:
    values = np.abs(np.random.default_rng(9).standard_normal(100_000)).astype(np.float32)
    hist = abs_histogram_from_arrays([values])
    amax = threshold_from_histogram(hist, "percentile", percentile=percentile)
    assert np.mean(values <= amax) >= percentile / 100
    assert np.mean(values <= amax - hist.bin_width) < percentile / 100


def test_percentile_of_100_is_the_max() -> None:
    hist = abs_histogram_from_arrays([np.random.default_rng(10).standard_normal(1000).astype(np.float32)])
    assert threshold_from_histogram(hist, "percentile", percentile=100.0) == hist.observed_max


def test_mse_threshold_finds_the_known_optimum_for_laplace_data() -> None:
    # For Laplace(0, b) and 8 bits the MSE-optimal clip is about 9.89 b (Banner et al., ACIQ, 2019).
    values = np.random.default_rng(11).laplace(size=200_000).astype(np.float32)
    hist = abs_histogram_from_arrays([values])
    amax = threshold_from_histogram(hist, "mse")
    assert amax == pytest.approx(9.89, rel=0.05)
    assert amax < hist.observed_max
    chosen = _quantization_mse(values, amax)
    assert chosen < _quantization_mse(values, hist.observed_max)
    assert chosen < _quantization_mse(values, 0.8 * amax)
    assert chosen < _quantization_mse(values, 1.1 * amax)


def _constant(value: float, n: int = 1000) -> AbsHistogram:
    return abs_histogram_from_arrays([np.full(n, value, np.float32)])


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
@pytest.mark.parametrize(
    ("hist", "expected"),
    [
        (abs_histogram_from_arrays([np.zeros(0, np.float32)]), FALLBACK_AMAX),
        (_constant(0.0), FALLBACK_AMAX),
        (_constant(-2.5), 2.5),
        (_constant(1e-38), MIN_AMAX),
    ],
    ids=["empty", "all-zero", "constant", "subnormal-scale"],
)
def test_degenerate_tensors_get_a_positive_threshold(
    method: str, hist: AbsHistogram, expected: float
) -> None:
    amax = threshold_from_histogram(hist, method)  # type: ignore[arg-type]
    assert amax == pytest.approx(expected, rel=1e-6)
    scale = np.float32(scale_from_threshold(amax))
    assert np.isfinite(scale) and scale > 0 and np.isfinite(np.float32(1) / scale)


def test_thresholds_from_histograms_keeps_every_name_in_order() -> None:
    hists = {name: _constant(value) for name, value in [("b", 2.0), ("a", 1.0), ("c", 3.0)]}
    thresholds = thresholds_from_histograms(hists, "max")
    assert list(thresholds) == ["b", "a", "c"]
    assert thresholds == pytest.approx({"b": 2.0, "a": 1.0, "c": 3.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "kl"}, "Unknown calibration method 'kl'; choose one of entropy, max, percentile, mse"),
        ({"method": "percentile", "percentile": 0.0}, r"percentile must be in \(0, 100\]"),
        ({"method": "percentile", "percentile": 100.5}, r"percentile must be in \(0, 100\]"),
        ({"method": "entropy", "num_quantized_bins": 1}, "num_quantized_bins must be at least 2"),
        ({"method": "entropy", "num_quantized_bins": 4096}, "fewer than the 4096 quantized bins"),
    ],
)
def test_invalid_options_are_rejected(kwargs: dict[str, object], message: str) -> None:
    hist = abs_histogram_from_arrays([np.random.default_rng(12).standard_normal(100).astype(np.float32)])
    with pytest.raises(BadInput, match=message):
        threshold_from_histogram(hist, **kwargs)  # type: ignore[arg-type]
