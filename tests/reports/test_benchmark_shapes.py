"""Choosing the input shapes of a benchmark: request, build range, calibration set, or a 400."""

from __future__ import annotations

import pytest

from service.backends.base import ShapeRange
from service.errors import BadInput
from service.onnx_graph.inspect import TensorSpec
from service.reports.benchmark_shapes import MAX_SAMPLE_ELEMENTS, benchmark_shapes

IMAGES = TensorSpec("images", "float32", ("batch", 3, "height", "width"))
FIXED = TensorSpec("scale", "float32", ("batch", 2))


def _shapes(requested=None, build=None, calibration=None):  # type: ignore[no-untyped-def]
    return benchmark_shapes(
        [IMAGES, FIXED],
        requested or {},
        build_shapes=build or {},
        calibration_shapes=calibration or {},
        engine_id="e1",
    )


def test_the_request_wins_over_the_build_range_and_the_calibration_set() -> None:
    build = {"images": ShapeRange((1, 3, 320, 320), (1, 3, 640, 640), (8, 3, 1280, 1280))}
    assert _shapes({"images": [4, 3, 480, 512]}, build, {"images": (3, 224, 224)}) == {
        "images": (4, 3, 480, 512)
    }
    assert _shapes(None, build, {"images": (3, 224, 224)}) == {"images": (1, 3, 640, 640)}
    assert _shapes(None, None, {"images": (3, 224, 320)}) == {"images": (1, 3, 224, 320)}


def test_inputs_without_dynamic_axes_besides_the_batch_need_nothing() -> None:
    assert "scale" not in _shapes({"images": [1, 3, 8, 8]})


def test_a_calibration_shape_that_contradicts_a_fixed_axis_is_not_used() -> None:
    with pytest.raises(BadInput, match="axis 2 \\('height'\\), 3 \\('width'\\)"):
        _shapes(None, None, {"images": (1, 224, 224)})


def test_nothing_to_size_the_dynamic_axes_with_is_a_400_naming_them_and_the_fix() -> None:
    with pytest.raises(BadInput) as caught:
        _shapes()
    message = caught.value.message
    assert "input 'images' axis 2 ('height'), 3 ('width')" in message
    assert '"shapes": {"images": [1, 3, 640, 640]}' in message and "--shape" in message
    assert caught.value.details == {"dynamic_axes": ["input 'images' axis 2 ('height'), 3 ('width')"]}


@pytest.mark.parametrize(
    ("requested", "message"),
    [
        ({"images": [1, 3, 64]}, "has 3 dims"),
        ({"images": [1, 1, 64, 64]}, "fixed at 3"),
        ({"images": [1, 3, -1, 64]}, "at least 1"),
        ({"images": [1, 3, 100_000, 100_000]}, f"over the limit of {MAX_SAMPLE_ELEMENTS}"),
        ({"image": [1, 3, 64, 64]}, "names 'image'"),
    ],
)
def test_unusable_requested_shapes_say_why(requested: dict[str, list[int]], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        _shapes(requested)
