"""Activation thresholds (amax) from |x| histograms; the INT8 scale is ``amax / 127``.

Methods (all symmetric, per tensor):

``max``
    The largest |x| seen.
``percentile``
    The right edge of the first bin at which the cumulative share of |x| reaches ``percentile`` %
    (default 99.99), capped at the largest |x|.
``mse``
    The candidate amax minimizing the expected squared error of symmetric INT8 quantization,
    ``sum_j counts[j] * (q(c_j) - c_j)**2`` with each bin's mass at its centre ``c_j`` and
    ``q(v) = s * min(round(v / s), 127)``, ``s = amax / 127`` (clipping and rounding both counted).
    Candidates are the same bin edges as for ``entropy``.
``entropy``
    TensorRT's ``EntropyCalibration2`` threshold search. Our reading, from NVIDIA's description
    (S. Migacz, "8-bit Inference with TensorRT", GTC 2017) and NVIDIA's own Python reproduction
    (``pytorch_quantization.calib.histogram._compute_amax_entropy`` in the TensorRT repository):

    1. H is a histogram of |x| with 2048 bins over [0, max |x|].
    2. The first bin is replaced by the second (``H[0] = H[1]``). After ReLU most of the mass sits
       in bin 0 as exact zeros, which every scale represents exactly; left in, they would dominate
       the divergence. (This is NVIDIA's reproduction; GTC 2017 does not mention it.)
    3. For every candidate i in [128, 2048]: the reference P is H[:i] with all outliers
       ``sum(H[i:])`` added to its last bin. The candidate Q splits H[:i] into 128 groups (bin j goes
       to group ``floor(j * 128 / i)``) and spreads each group's count evenly over the group's
       non-empty bins; empty bins of H stay empty in Q. Both are normalised and KL(P || Q) is taken;
       a bin where P > 0 and Q = 0 (empty last bin with outliers) makes the divergence infinite.
    4. The threshold is the right edge ``i * bin_width`` of the candidate with the smallest
       divergence; near-ties (within 1e-12 nats) go to the largest i, as in NVIDIA's code.

    GTC 2017 puts the threshold at the centre of bin m, ``(m + 0.5) * width``; NVIDIA's reproduction
    uses the edge. The difference is half a bin (1/4096 of the range) and we follow the code.

    The search is vectorised: with cumulative sums of H, of ``H log H`` and of the non-empty-bin
    indicator, the divergence of every candidate is an expression over its 128 group sums, so all
    1921 candidates cost one (1921 x 128) array pass (about 2 ms measured) instead of a Python loop
    over candidates and bins (ONNX Runtime's costs 0.3-0.9 s per tensor).

Cross-check with ONNX Runtime (``tests/calibration/test_ort_crosscheck.py``, ResNet-style test model,
32 photo crops, ``CalibrationMethod.Entropy`` with ``num_bins=2048, num_quantized_bins=128``; ONNX
Runtime's amax is the larger side of its range). Stated tolerance: on signed tensors (Conv outputs,
the input) ours / ort lies in [0.75, 1.33] (measured 0.78-1.27 over three data seeds); on one-signed
tensors (ReLU outputs) ours is larger, ours / ort in [1.0, 2.5] (measured 1.25-1.96). Both
thresholds are always within the tensor's max. The differences are systematic:

* The zero spike. ONNX Runtime keeps bin 0 (where the exact zeros after ReLU fall, often half the
  mass) in the divergence. Its candidate Q spreads that spike over the bins of its quantized group,
  and the group widens with the threshold, so the divergence grows with the threshold and its
  optimum is pulled down. TensorRT's reading replaces bin 0 by bin 1, which is why our ReLU
  thresholds are higher (measured: without that step our ReLU thresholds drop to 0.23-0.71 of
  ONNX Runtime's). On signed tensors the spike is small and the two stay close.
* Levels per sign. ONNX Runtime histograms *signed* values over [-max, max] and splits the whole
  window into the 128 quantized bins: 64 levels per sign where INT8 (and TensorRT) has 128.
* Resolution and candidates. |x| gets 1024 of its 2048 bins (twice our width); its thresholds are
  (i + 1) * width for i in [64, 1024] against our i * width for i in [128, 2048].
* Smoothing. It adds an epsilon of 1e-4 to empty bins of P and Q, where TensorRT's reading makes a
  candidate whose last bin is empty but has outliers infinitely bad; with sparse tails (few
  elements, e.g. pooled features) ours then stays at the max where ONNX Runtime clips.

Degenerate tensors: an empty histogram or an all-zero tensor gets amax = 1.0 (any positive scale
represents zeros exactly; 1.0 keeps the scale and its reciprocal ordinary numbers); every other
result is at least ``MIN_AMAX`` so that ``amax / 127`` is a normal float32 with a finite reciprocal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np

from service.calibration.histograms import AbsHistogram
from service.errors import BadInput

CalibrationMethod = Literal["entropy", "max", "percentile", "mse"]
CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = get_args(CalibrationMethod)

INT8_MAX = 127
DEFAULT_PERCENTILE = 99.99
DEFAULT_NUM_QUANTIZED_BINS = 128
# amax for tensors with nothing to measure (no elements, or all zeros).
FALLBACK_AMAX = 1.0
# Smallest amax returned: amax / 127 stays a normal float32 and 127 / amax stays finite.
MIN_AMAX = 1e-30
# Divergences closer than this are ties; ties go to the larger threshold (less clipping).
_KL_TIE_TOLERANCE = 1e-12
# Candidates per vectorised MSE step: bounds the (candidates x bins) temporaries to ~4 MB.
_MSE_CANDIDATE_CHUNK = 256


def threshold_from_histogram(
    hist: AbsHistogram,
    method: CalibrationMethod,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    num_quantized_bins: int = DEFAULT_NUM_QUANTIZED_BINS,
) -> float:
    """The amax (clipping threshold for |x|) of one tensor; always finite and positive."""
    _check_options(method, percentile, num_quantized_bins)
    if hist.is_empty() or hist.observed_max <= 0.0:
        return FALLBACK_AMAX
    if method == "max":
        threshold = hist.observed_max
    elif method == "percentile":
        threshold = _percentile_threshold(hist, percentile)
    elif method == "mse":
        threshold = _mse_threshold(hist, num_quantized_bins)
    else:
        threshold = _entropy_threshold(hist, num_quantized_bins)
    return max(min(threshold, hist.observed_max), MIN_AMAX)


def thresholds_from_histograms(
    hists: Mapping[str, AbsHistogram],
    method: CalibrationMethod,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    num_quantized_bins: int = DEFAULT_NUM_QUANTIZED_BINS,
) -> dict[str, float]:
    """amax per tensor name, in the order of ``hists``."""
    _check_options(method, percentile, num_quantized_bins)
    return {
        name: threshold_from_histogram(
            hist, method, percentile=percentile, num_quantized_bins=num_quantized_bins
        )
        for name, hist in hists.items()
    }


def scale_from_threshold(amax: float) -> float:
    """The symmetric INT8 scale for an amax: ``amax / 127``."""
    return amax / INT8_MAX


def _check_options(method: str, percentile: float, num_quantized_bins: int) -> None:
    if method not in CALIBRATION_METHODS:
        raise BadInput(
            f"Unknown calibration method '{method}'; choose one of {', '.join(CALIBRATION_METHODS)}."
        )
    if not (0.0 < percentile <= 100.0):
        raise BadInput(f"percentile must be in (0, 100], got {percentile}; 99.99 is a common choice.")
    if num_quantized_bins < 2:
        raise BadInput(f"num_quantized_bins must be at least 2, got {num_quantized_bins}; INT8 uses 128.")


def _percentile_threshold(hist: AbsHistogram, percentile: float) -> float:
    cumulative = np.cumsum(hist.counts)
    needed = percentile / 100.0 * hist.count
    # First bin whose cumulative count reaches the share; its right edge bounds every value in it.
    index = int(np.searchsorted(cumulative, needed, side="left"))
    index = min(index, hist.num_bins - 1)
    return (index + 1) * hist.bin_width


def _candidate_bins(hist: AbsHistogram, num_quantized_bins: int) -> np.ndarray:
    if hist.num_bins < num_quantized_bins:
        raise BadInput(
            f"The histogram has {hist.num_bins} bins, fewer than the {num_quantized_bins} quantized "
            "bins to search over; collect at least as many bins (2048 is the standard)."
        )
    return np.arange(num_quantized_bins, hist.num_bins + 1, dtype=np.int64)


def _entropy_threshold(hist: AbsHistogram, num_quantized_bins: int) -> float:
    candidates = _candidate_bins(hist, num_quantized_bins)
    kl = entropy_divergences(hist, num_quantized_bins)
    best = float(kl.min())
    chosen = candidates[np.flatnonzero(kl <= best + _KL_TIE_TOLERANCE)[-1]]
    return float(chosen) * hist.bin_width


def entropy_divergences(
    hist: AbsHistogram, num_quantized_bins: int = DEFAULT_NUM_QUANTIZED_BINS
) -> np.ndarray:
    """KL(P || Q) for every candidate bin count i in [num_quantized_bins, num_bins] (``inf`` allowed).

    Exposed for diagnostics (plots of the divergence curve) and for tests against a direct loop.
    """
    candidates = _candidate_bins(hist, num_quantized_bins)
    counts = hist.counts.astype(np.float64)
    if counts.size > 1:
        counts[0] = counts[1]
    total = counts.sum()
    if total <= 0.0:
        return np.zeros(candidates.size)

    cum_counts = np.concatenate(([0.0], np.cumsum(counts)))
    cum_nonempty = np.concatenate(([0], np.cumsum(counts > 0)))
    cum_xlogx = np.concatenate(([0.0], np.cumsum(_xlogx(counts))))

    # Group k of candidate i covers bins [ceil(k*i/nq), ceil((k+1)*i/nq)): exactly the bins j with
    # floor(j*nq/i) == k. Integer arithmetic keeps the boundaries exact.
    k = np.arange(num_quantized_bins + 1, dtype=np.int64)
    bounds = (candidates[:, None] * k[None, :] + num_quantized_bins - 1) // num_quantized_bins
    group_sums = np.diff(cum_counts[bounds], axis=1)
    group_nonempty = np.diff(cum_nonempty[bounds], axis=1)

    outliers = total - cum_counts[candidates]
    last = counts[candidates - 1]
    kept = cum_counts[candidates]  # the mass of Q before normalisation

    # sum_j P_j log P_j: H log H up to i-1, then the last bin with the outliers folded in.
    p_log_p = cum_xlogx[candidates - 1] + _xlogx(last + outliers)
    # sum_j P_j log Q_j: inside group k every non-empty bin carries Q = G_k / n_k and P sums to
    # G_k; the outliers sit on bin i-1, in the last group.
    with np.errstate(divide="ignore", invalid="ignore"):
        per_group = np.where(group_sums > 0, group_sums * np.log(group_sums / group_nonempty), 0.0)
        last_q = np.where(
            group_nonempty[:, -1] > 0, group_sums[:, -1] / np.maximum(group_nonempty[:, -1], 1), 0.0
        )
        outlier_term = np.where(outliers > 0, outliers * np.log(np.where(last > 0, last_q, 1.0)), 0.0)
        p_log_q = per_group.sum(axis=1) + outlier_term
        kl = (p_log_p - p_log_q) / total + np.log(kept) - np.log(total)
    # An empty last bin with outliers: P has mass where Q has none.
    kl[(last == 0) & (outliers > 0)] = np.inf
    # Rounding can push an exact zero a hair below it.
    return np.where(np.isfinite(kl), np.maximum(kl, 0.0), np.inf)


def _mse_threshold(hist: AbsHistogram, num_quantized_bins: int) -> float:
    candidates = _candidate_bins(hist, num_quantized_bins)
    width = hist.bin_width
    centres = (np.arange(hist.num_bins, dtype=np.float64) + 0.5) * width
    counts = hist.counts.astype(np.float64)
    occupied = counts > 0
    centres, counts = centres[occupied], counts[occupied]
    errors = np.empty(candidates.size)
    for start in range(0, candidates.size, _MSE_CANDIDATE_CHUNK):
        amax = candidates[start : start + _MSE_CANDIDATE_CHUNK, None] * width
        step = amax / INT8_MAX
        levels = np.minimum(np.rint(centres[None, :] / step), INT8_MAX)
        errors[start : start + amax.shape[0]] = (((levels * step - centres[None, :]) ** 2) * counts).sum(
            axis=1
        )
    best = float(errors.min())
    # Ties go to the larger threshold, as for entropy: with the mass of the top bin at its centre,
    # clipping just below it and keeping it cost the same, and keeping it is exact for constants.
    chosen = candidates[np.flatnonzero(errors <= best * (1.0 + 1e-12))[-1]]
    return float(chosen) * width


def _xlogx(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, values * np.log(np.where(values > 0, values, 1.0)), 0.0)
