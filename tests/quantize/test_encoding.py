"""INT8 encodings for ONNX Runtime: activation zero points and scales, int32 biases."""

from __future__ import annotations

import numpy as np
import pytest

from service.quantize.encoding import ActivationEncoding, int32_bias, ort_activation_encoding


@pytest.mark.parametrize(
    ("activation_type", "non_negative", "zero_point", "levels"),
    [("uint8", True, 0, 255), ("uint8", False, 128, 127), ("int8", True, -128, 255), ("int8", False, 0, 127)],
)
def test_non_negative_tensors_get_all_255_steps_from_the_bottom_of_the_type(
    activation_type: str, non_negative: bool, zero_point: int, levels: int
) -> None:
    encoding = ort_activation_encoding(
        5.1,
        non_negative=non_negative,
        upper_bound=None,
        activation_type=activation_type,  # type: ignore[arg-type]
    )

    assert encoding.zero_point == zero_point
    assert encoding.scale == pytest.approx(5.1 / levels)
    assert encoding.numpy_zero_point().dtype == (np.uint8 if activation_type == "uint8" else np.int8)


@pytest.mark.parametrize("bound", [6.0, 1.0, 0.1, 3.3, 255.0 / 7])
def test_a_folded_clip_bound_is_never_exceeded_in_float32(bound: float) -> None:
    encoding = ort_activation_encoding(
        bound * 1.5, non_negative=True, upper_bound=bound, activation_type="uint8"
    )

    scale = np.float32(encoding.scale)
    assert scale * np.float32(255) <= bound and float(scale) * 255 <= bound
    assert float(scale) * 255 == pytest.approx(bound, rel=1e-6)  # and gives nothing away


def test_a_tensor_that_was_all_zeros_gets_a_usable_scale() -> None:
    assert ort_activation_encoding(0.0, non_negative=False, upper_bound=None, activation_type="uint8") == (
        ActivationEncoding(scale=1.0, zero_point=128, dtype="uint8")
    )
    clipped = ort_activation_encoding(0.0, non_negative=True, upper_bound=6.0, activation_type="uint8")
    assert clipped.scale == pytest.approx(6.0 / 255, rel=1e-6)


def test_int32_bias_is_the_bias_over_input_times_weight_scale() -> None:
    bias = np.array([0.5, -0.25, 0.0], np.float32)
    weight_scale = np.array([0.01, 0.02, 0.04], np.float32)

    values, scale = int32_bias(bias, 0.1, weight_scale)

    np.testing.assert_allclose(scale, np.float32(0.1) * weight_scale)
    np.testing.assert_array_equal(values, np.array([500, -125, 0], np.int32))
    assert values.dtype == np.int32 and scale.dtype == np.float32


def test_int32_bias_beyond_the_int32_range_is_clipped() -> None:
    values, _ = int32_bias(np.array([1e9, -1e9], np.float32), 1e-3, np.array(1e-4, np.float32))

    assert values.tolist() == [np.iinfo(np.int32).max, np.iinfo(np.int32).min]
