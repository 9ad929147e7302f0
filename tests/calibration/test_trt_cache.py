"""TensorRT calibration cache text: hand-made samples, round trips and malformed files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.calibration.trt_cache import (
    calibration_cache_from_scales,
    scales_from_calibration_cache,
    trt_version_code,
    with_trt_version,
)
from service.errors import BadInput

# Built by hand from the documented format: big-endian float32 bits of each scale.
#   1.0       = sign 0, exponent 127, mantissa 0     -> 0x3f800000
#   0.0078125 = 2**-7: exponent 120                  -> 0x3c000000
#   2.0       = exponent 128                         -> 0x40000000
#   1/127     = 0.007874016...                       -> 0x3c010204
HAND_MADE = (
    b"TRT-100100-EntropyCalibration2\n"
    b"input: 3f800000\n"
    b"/stem/conv/Conv_output_0: 3c000000\n"
    b"(Unnamed Layer* 4) [Shuffle]_output: 40000000\n"
    b"input:0: 3c010204\n"
)


def test_writing_known_scales_produces_the_hand_made_cache() -> None:
    scales = {
        "input": 1.0,
        "/stem/conv/Conv_output_0": 0.0078125,
        "(Unnamed Layer* 4) [Shuffle]_output": 2.0,
        "input:0": 1.0 / 127.0,
    }
    assert calibration_cache_from_scales(scales, trt_version="10.1.0") == HAND_MADE


def test_reading_the_hand_made_cache_recovers_names_scales_and_header() -> None:
    cache = scales_from_calibration_cache(HAND_MADE)
    assert cache.version_code == "100100"
    assert cache.algorithm == "EntropyCalibration2"
    assert list(cache.scales) == [
        "input",
        "/stem/conv/Conv_output_0",
        "(Unnamed Layer* 4) [Shuffle]_output",
        "input:0",
    ]
    assert cache.scales["input"] == 1.0
    assert cache.scales["/stem/conv/Conv_output_0"] == 0.0078125
    assert cache.scales["input:0"] == float(np.float32(1.0 / 127.0))
    assert cache.thresholds()["input"] == 127.0


def test_a_cache_written_by_tensorrt_8_without_trailing_newline_is_read() -> None:
    data = b"TRT-8601-EntropyCalibration2\r\ndata: 3c008912\r\nconv1: 3C60DD38"
    cache = scales_from_calibration_cache(data)
    assert cache.version_code == "8601"
    assert cache.scales == {
        "data": struct.unpack(">f", bytes.fromhex("3c008912"))[0],
        "conv1": struct.unpack(">f", bytes.fromhex("3c60dd38"))[0],
    }


@settings(max_examples=50, deadline=None, database=None)
@given(
    scales=st.dictionaries(
        st.text(st.characters(blacklist_categories=["Cs"]), min_size=1).filter(
            lambda s: s.splitlines() == [s]
        ),
        st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False),
        max_size=20,
    )
)
def test_scales_survive_a_round_trip_as_float32(scales: dict[str, float]) -> None:
    cache = scales_from_calibration_cache(calibration_cache_from_scales(scales))
    assert cache.algorithm == "EntropyCalibration2"
    assert list(cache.scales) == list(scales)
    for name, scale in scales.items():
        assert cache.scales[name] == float(np.float32(scale))


@pytest.mark.parametrize(
    ("version", "code"),
    [
        ("10.1.0", "100100"),
        ("10.13.3.9", "101303"),
        ("8.6.1", "8601"),
        ("7.1.3.4", "7103"),
        ("10.0", "100000"),
    ],
)
def test_version_codes_follow_nv_tensorrt_version(version: str, code: str) -> None:
    assert trt_version_code(version) == code


def test_a_cache_can_be_reheaded_for_another_tensorrt_without_changing_scales() -> None:
    old = calibration_cache_from_scales({"x": 0.5, "y": 0.25}, trt_version="8.6.1")
    new = with_trt_version(old, "10.3.0")
    assert new.startswith(b"TRT-100300-EntropyCalibration2\n")
    assert new.split(b"\n")[1:] == old.split(b"\n")[1:]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "The calibration cache is empty"),
        (b"\n\n", "The calibration cache is empty"),
        (b"\xff\xfe", "not UTF-8 text"),
        (b"TRT-10x-EntropyCalibration2\n", "Line 1 of the calibration cache"),
        (b"input: 3f800000\n", "Line 1 of the calibration cache"),
        (
            b"TRT-100100-EntropyCalibration2\ninput 3f800000\n",
            "Line 2 .* expected '<tensor name>: <1 to 8 hex digits>'",
        ),
        (b"TRT-100100-EntropyCalibration2\ninput: 3f80000g\n", "Line 2"),
        (b"TRT-100100-EntropyCalibration2\n: 3f800000\n", "Line 2"),
        (b"TRT-100100-EntropyCalibration2\nx: 3f800000\n\ny: 3f800000\n", "Line 3"),
        (b"TRT-100100-EntropyCalibration2\nx: 3f800000\nx: 40000000\n", "Line 3 .* repeats tensor 'x'"),
        (b"TRT-100100-EntropyCalibration2\nx: 7fc00000\n", "Line 2 .* gives tensor 'x' the scale nan"),
        (b"TRT-100100-EntropyCalibration2\nx: 123456789\n", "Line 2"),
    ],
)
def test_malformed_caches_are_rejected_with_the_offending_line(data: bytes, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        scales_from_calibration_cache(data)


@pytest.mark.parametrize(
    ("scales", "kwargs", "message"),
    [
        ({"x": float("nan")}, {}, "is NaN; a calibration cache needs a number"),
        ({"x": 1e39}, {}, "does not fit a float32"),
        ({"x": 1e-50}, {}, "rounds to zero in float32"),
        ({"": 1.0}, {}, "cannot be written to a calibration cache line"),
        ({"a\nb": 1.0}, {}, "cannot be written to a calibration cache line"),
        ({"a\u2028b": 1.0}, {}, "cannot be written to a calibration cache line"),
        ({"x": 1.0}, {"algorithm": "KLCalibration"}, "Unknown calibration algorithm 'KLCalibration'"),
        ({"x": 1.0}, {"trt_version": "ten"}, "'ten' is not a TensorRT version"),
        ({"x": 1.0}, {"trt_version": "10.100.0"}, "component above 99"),
    ],
)
def test_unwritable_scales_and_options_are_rejected(
    scales: dict[str, float], kwargs: dict[str, str], message: str
) -> None:
    with pytest.raises(BadInput, match=message):
        calibration_cache_from_scales(scales, **kwargs)


# As TensorRT itself writes caches: hex without leading zeros (a zero scale is "0"), infinity as
# 7f800000 and some negative values, under the headers of TensorRT 8.6 and 10.x.
TENSORRT_8_6 = (
    b"TRT-8601-EntropyCalibration2\n"
    b"input: 3c010a14\n"
    b"(Unnamed Layer* 2) [Constant]_output: 0\n"
    b"(Unnamed Layer* 3) [Shape]_output: 7f800000\n"
    b"conv1: 3d3fb1c2\n"
    b"offset: bf000000\n"
)
TENSORRT_10_8 = (
    b"TRT-100800-EntropyCalibration2\n"
    b"images: 3c010204\n"
    b"/model.0/conv/Conv_output_0: 3d9a5e1f\n"
    b"/Shape_output_0: 7f800000\n"
    b"/Constant_3_output_0: 0\n"
    b"/model.22/Sub_output_0: c0a00000\n"
)


@pytest.mark.parametrize("written", [TENSORRT_8_6, TENSORRT_10_8], ids=["trt8.6", "trt10.8"])
def test_a_cache_tensorrt_wrote_round_trips_bit_for_bit(written: bytes) -> None:
    cache = scales_from_calibration_cache(written)
    again = calibration_cache_from_scales(
        cache.scales, trt_version=_version_of(cache.version_code), algorithm=cache.algorithm
    )
    assert again == written


def _version_of(code: str) -> str:
    number = int(code)
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def test_zero_infinite_and_negative_scales_are_read_but_give_no_threshold() -> None:
    cache = scales_from_calibration_cache(TENSORRT_10_8)
    assert cache.scales["/Constant_3_output_0"] == 0.0
    assert cache.scales["/Shape_output_0"] == float("inf")
    assert cache.scales["/model.22/Sub_output_0"] == -5.0
    assert cache.unusable() == ("/Shape_output_0", "/Constant_3_output_0", "/model.22/Sub_output_0")
    thresholds = cache.thresholds()
    assert set(thresholds) == {"images", "/model.0/conv/Conv_output_0"}
    assert all(np.isfinite(v) and v > 0 for v in thresholds.values())


def test_an_infinite_scale_is_written_as_tensorrt_writes_it() -> None:
    # The CPU quantize path writes amax / 127 for every calibrated tensor: an infinite amax must not
    # make the cache writer fail.
    assert calibration_cache_from_scales({"x": float("inf"), "z": 0.0}, trt_version="10.8.0") == (
        b"TRT-100800-EntropyCalibration2\nx: 7f800000\nz: 0\n"
    )


def test_reheading_a_tensorrt_cache_keeps_its_zero_and_infinite_lines() -> None:
    new = with_trt_version(TENSORRT_8_6, "10.8.0")
    assert new.split(b"\n")[1:] == TENSORRT_8_6.split(b"\n")[1:]
