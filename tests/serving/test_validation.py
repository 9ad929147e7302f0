"""Inference inputs checked against IOSpecs: names, dtypes (safe casts from JSON only), dims, profiles."""

from __future__ import annotations

import numpy as np
import pytest

from service.backends.base import IOSpec, ShapeRange
from service.errors import InvalidInferenceInput
from service.serving.validation import validate_feeds

IMAGE = IOSpec(name="image", dtype="float32", shape=("N", 3, 8, 8))
BIAS = IOSpec(name="bias_map", dtype="float32", shape=("N", 4, 8, 8))
TOKENS = IOSpec(name="tokens", dtype="int32", shape=("N", 5))
PROFILED = IOSpec(
    name="x",
    dtype="float32",
    shape=("N", 3, "H", "H"),
    profile=ShapeRange(min=(1, 3, 16, 16), opt=(4, 3, 32, 32), max=(8, 3, 64, 64)),
)


def test_matching_feeds_come_back_in_spec_order_without_copies() -> None:
    bias = np.zeros((2, 4, 8, 8), np.float32)
    image = np.ones((2, 3, 8, 8), np.float32)
    checked = validate_feeds({"bias_map": bias, "image": image}, [IMAGE, BIAS])
    assert list(checked) == ["image", "bias_map"]
    assert checked["image"] is image and checked["bias_map"] is bias


def test_missing_and_unexpected_names_are_both_reported_with_what_the_engine_takes() -> None:
    with pytest.raises(InvalidInferenceInput, match=r"missing \['bias_map'\], unexpected \['bias'\]") as info:
        validate_feeds({"image": np.zeros((1, 3, 8, 8), np.float32), "bias": np.zeros(1)}, [IMAGE, BIAS])
    assert "'bias_map' float32 [N, 4, 8, 8]" in info.value.message
    assert info.value.details["missing"] == ["bias_map"]


def test_binary_inputs_of_another_dtype_are_refused_never_cast() -> None:
    with pytest.raises(
        InvalidInferenceInput, match=r"'image' is float64, but the engine expects float32.*never cast"
    ):
        validate_feeds({"image": np.zeros((1, 3, 8, 8))}, [IMAGE])


def test_json_floats_and_ints_are_cast_to_the_engine_float_dtype() -> None:
    checked = validate_feeds({"image": np.full((1, 3, 8, 8), 0.1)}, [IMAGE], allow_safe_casts=True)
    assert checked["image"].dtype == np.float32
    assert checked["image"][0, 0, 0, 0] == np.float32(0.1)
    ints = validate_feeds({"image": np.ones((1, 3, 8, 8), np.int64)}, [IMAGE], allow_safe_casts=True)
    assert ints["image"].dtype == np.float32


def test_json_values_outside_the_target_range_are_refused() -> None:
    big = np.full((1, 3, 8, 8), 1e39)
    with pytest.raises(InvalidInferenceInput, match="outside the range of float32"):
        validate_feeds({"image": big}, [IMAGE], allow_safe_casts=True)
    with pytest.raises(
        InvalidInferenceInput, match=r"values from 0 to 3000000000, outside the range of int32"
    ):
        validate_feeds({"tokens": np.array([[0, 1, 2, 3, 3_000_000_000]])}, [TOKENS], allow_safe_casts=True)


def test_json_fractions_are_not_cast_to_integer_inputs() -> None:
    with pytest.raises(
        InvalidInferenceInput, match=r"floating-point numbers, which cannot be cast safely to .* int32"
    ):
        validate_feeds({"tokens": np.full((1, 5), 1.5)}, [TOKENS], allow_safe_casts=True)
    checked = validate_feeds({"tokens": np.arange(5).reshape(1, 5)}, [TOKENS], allow_safe_casts=True)
    assert checked["tokens"].dtype == np.int32


def test_json_booleans_are_not_numbers() -> None:
    with pytest.raises(InvalidInferenceInput, match="true/false values"):
        validate_feeds({"image": np.ones((1, 3, 8, 8), bool)}, [IMAGE], allow_safe_casts=True)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((3, 8, 8), r"rank 3 \(shape \[3, 8, 8\]\), but the engine expects rank 4: \[N, 3, 8, 8\]"),
        ((1, 3, 8, 7), r"axis 3 is fixed at 8, got 7"),
        ((1, 1, 8, 8), r"axis 1 is fixed at 3, got 1"),
        ((0, 3, 8, 8), r"empty along axis 0"),
    ],
)
def test_shapes_that_do_not_fit_name_the_axis(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(InvalidInferenceInput, match=message):
        validate_feeds({"image": np.zeros(shape, np.float32)}, [IMAGE])


def test_dynamic_dims_must_stay_inside_the_optimization_profile() -> None:
    validate_feeds({"x": np.zeros((8, 3, 64, 64), np.float32)}, [PROFILED])
    with pytest.raises(InvalidInferenceInput, match=r"size 9 on axis 0 .* profile 1..8"):
        validate_feeds({"x": np.zeros((9, 3, 16, 16), np.float32)}, [PROFILED])
    with pytest.raises(InvalidInferenceInput, match=r"size 8 on axis 2 .* profile 16..64"):
        validate_feeds({"x": np.zeros((1, 3, 8, 8), np.float32)}, [PROFILED])


def test_one_symbolic_dim_means_one_size_across_inputs() -> None:
    with pytest.raises(
        InvalidInferenceInput, match=r"'N' must be one size across inputs.*'image' axis 0 has 2.*has 3"
    ):
        validate_feeds(
            {"image": np.zeros((2, 3, 8, 8), np.float32), "bias_map": np.zeros((3, 4, 8, 8), np.float32)},
            [IMAGE, BIAS],
        )


def test_the_same_symbol_within_one_input_must_agree_too() -> None:
    with pytest.raises(InvalidInferenceInput, match="'H' must be one size"):
        validate_feeds({"x": np.zeros((1, 3, 16, 32), np.float32)}, [PROFILED])


def test_non_contiguous_inputs_are_made_contiguous() -> None:
    strided = np.zeros((1, 3, 8, 16), np.float32)[..., ::2]
    checked = validate_feeds({"image": strided}, [IMAGE])
    assert checked["image"].flags.c_contiguous


def test_big_endian_binary_inputs_are_converted_not_refused() -> None:
    data = np.arange(3 * 64, dtype=">f4").reshape(1, 3, 8, 8)
    checked = validate_feeds({"image": data}, [IMAGE])
    assert checked["image"].dtype == np.float32
    np.testing.assert_array_equal(checked["image"], data.astype(np.float32))
