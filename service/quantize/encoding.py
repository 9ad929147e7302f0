"""INT8 encodings: how float weights, activations and biases become integers and scales.

Contract: pure functions of numbers (no graphs). Two families:

- TensorRT-style symmetric INT8 (``qdq.py``): :func:`quantize_weight` (per-output-channel, values in
  [-127, 127], FP16-exact scales) and :func:`activation_scale` (``amax / 127``, zero point 0).
- ONNX Runtime activations (``ort_qdq.py``): :func:`ort_activation_encoding` picks the zero point and
  scale of one activation for its integer kernels, and :func:`int32_bias` re-encodes a float bias at
  ``input_scale * weight_scale`` as QLinearConv/QGemm require.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

INT8_MAX = 127  # symmetric narrow range [-127, 127], as TensorRT quantizes
FP16_SMALLEST_SUBNORMAL = 2.0**-24
FP16_MAX = 65504.0
_INT32 = np.iinfo(np.int32)

ActivationType = Literal["uint8", "int8"]


@dataclass(frozen=True)
class ActivationEncoding:
    """Scale and zero point of one quantized activation; ``dtype`` is the type QuantizeLinear writes."""

    scale: float
    zero_point: int
    dtype: ActivationType

    def numpy_zero_point(self) -> np.ndarray:
        return np.array(self.zero_point, dtype=np.uint8 if self.dtype == "uint8" else np.int8)


def quantize_weight(
    weight: np.ndarray, axis: int | None, *, qmax: int = INT8_MAX
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 values in [-qmax, qmax] and float32 scales of a float weight (per channel along
    ``axis``). ``qmax`` 64 is the 7-bit range for CPUs whose U8S8 kernels saturate (``cpu_isa.py``).

    Scales are FP16-exact (see :func:`fp16_exact_scales`), so FP16 typing never re-rounds them.
    """
    values = weight.astype(np.float64)
    if axis is None:
        amax = np.asarray(np.max(np.abs(values)) if values.size else 0.0)
        shape: list[int] = []
    else:
        reduce_axes = tuple(a for a in range(values.ndim) if a != axis)
        amax = np.max(np.abs(values), axis=reduce_axes) if values.size else np.zeros(values.shape[axis])
        shape = [-1 if a == axis else 1 for a in range(values.ndim)]
    scale = fp16_exact_scales(np.where(amax > 0, amax / qmax, 1.0))
    quantized = np.clip(np.rint(values / scale.astype(np.float64).reshape(shape)), -qmax, qmax)
    return quantized.astype(np.int8), scale


def activation_scale(amax: float) -> float:
    """The per-tensor INT8 scale for an activation range [-amax, amax] (FP16-exact, 1 for amax 0)."""
    return float(fp16_exact_scales(np.asarray(amax / INT8_MAX if amax > 0 else 1.0))[()])


def fp16_exact_scales(scales: np.ndarray) -> np.ndarray:
    """``scales`` rounded up to values FP16 represents exactly, as float32.

    Rounding up never clips: ``amax / scale`` stays <= 127. Scales below FP16's smallest subnormal
    (2**-24; a channel whose weights are all below 7.6e-6) become that value, scales above FP16's largest
    value (an amax beyond 8.3e6, which FP16 layers could not carry anyway) that value. The cost is at most one
    FP16 ulp (2**-11 relative) of extra grid coarseness; the gain is that one Q/DQ model serves both
    FP32-typed and FP16-typed INT8 layers without rounding the scales a second time.
    """
    target = np.atleast_1d(np.clip(np.asarray(scales, dtype=np.float64), FP16_SMALLEST_SUBNORMAL, FP16_MAX))
    half = target.astype(np.float16)
    low = half.astype(np.float64) < target  # never true at FP16_MAX, so nextafter cannot overflow
    half[low] = np.nextafter(half[low], np.float16(np.inf))
    return half.astype(np.float32).reshape(np.shape(scales))


def ort_activation_encoding(
    amax: float, *, non_negative: bool, upper_bound: float | None, activation_type: ActivationType
) -> ActivationEncoding:
    """The encoding of an activation in [-amax, amax] (or [0, amax]) for ONNX Runtime's integer kernels.

    A tensor known to be >= 0 gets its zero point at the bottom of the type (0 for uint8, -128 for
    int8) and all 255 steps over [0, amax]: twice the resolution of a symmetric grid, and the form ORT
    needs to drop a Relu/Clip in front of the QuantizeLinear. Other tensors get a symmetric grid,
    ``amax / 127`` around zero point 128 (uint8) or 0 (int8), matching the symmetric |x| ranges the
    calibration computes. ``upper_bound`` (a folded Clip's max) caps the range so that
    ``255 * scale <= upper_bound`` holds in float32, or ORT would keep the Clip and the node unit with
    it in float. A zero amax (the tensor was all zeros) gets the widest harmless range instead of a
    zero scale.
    """
    levels = 255 if non_negative else INT8_MAX
    limit = float(amax)
    if upper_bound is not None and upper_bound > 0:
        limit = min(limit, upper_bound) if limit > 0 else upper_bound
    scale = np.float32(limit / levels) if limit > 0 else np.float32(1.0)
    scale = max(scale, np.float32(np.finfo(np.float32).tiny))
    if upper_bound is not None and upper_bound > 0:
        while np.float32(scale * np.float32(levels)) > upper_bound or float(scale) * levels > upper_bound:
            scale = np.nextafter(scale, np.float32(0.0))
    # Zero point at the bottom of the type for [0, amax], in the middle for [-amax, amax].
    bottom, middle = (0, 128) if activation_type == "uint8" else (-128, 0)
    zero_point = bottom if non_negative else middle
    return ActivationEncoding(scale=float(scale), zero_point=zero_point, dtype=activation_type)


def int32_bias(
    bias: np.ndarray, input_scale: float, weight_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A float bias as int32 values and float32 scales ``input_scale * weight_scale`` (one per channel).

    Values beyond the int32 range (a bias far larger than anything the layer's products reach) are
    clipped; with calibrated scales that does not happen in practice.
    """
    scale = (np.float32(input_scale) * np.asarray(weight_scale, dtype=np.float32)).astype(np.float32)
    values = np.rint(bias.astype(np.float64).reshape(scale.shape or bias.shape) / scale.astype(np.float64))
    return np.clip(values, _INT32.min, _INT32.max).astype(np.int32), scale
