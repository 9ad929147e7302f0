"""Image preprocessing: spec validation, resize geometry, channel order, layout, normalization, decoding."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image
from pydantic import ValidationError

from service.datasets.preprocess import (
    DEFAULT_SCALE,
    ImagePlacement,
    PreprocessSpec,
    image_to_array,
    placement_for,
)
from service.errors import InvalidCalibrationSet, TooLarge


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **save_args: Any) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def spec(**fields: Any) -> PreprocessSpec:
    return PreprocessSpec.model_validate(fields)


ASTRONAUT_PNG = encode(skimage.data.astronaut())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"size": [224, 224], "mean": [0.5, 0.5]}, "mean needs 1 or 3 values"),
        ({"size": [224, 224], "std": [0.2, 0.0, 0.2]}, "std values must be positive"),
        ({"dtype": "uint8", "mean": [120.0]}, "dtype uint8 keeps raw pixels"),
        ({"dtype": "uint8", "scale": 1.0}, "dtype uint8 keeps raw pixels"),
        ({"resize": "letterbox"}, "needs a target size"),
        ({"size": [8, 8], "pad_value": 114}, "pad_value only applies to resize 'letterbox'"),
        ({"size": [8, 8], "resize": "letterbox", "crop_fraction": 0.875}, "crop_fraction only applies"),
        ({"size": [0, 8]}, "greater than or equal to 1"),
        ({"scale": -1.0}, "scale must be a positive finite number"),
        ({"layout": "CHW"}, "NCHW"),
        ({"colour": "rgb"}, "Extra inputs are not permitted"),
        ({"channels": 1, "mean": [0.1, 0.2, 0.3]}, "mean needs 1 or 1 values"),
    ],
)
def test_spec_rejects_inconsistent_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"size": [224, 224], "resize": "letterbox", "pad_value": 114, "mean": [0.5], "std": [0.25]},
        {"size": [224, 224], "resize": "shorter_side_center_crop", "crop_fraction": 0.875},
        {"dtype": "uint8", "layout": "NHWC", "channel_order": "BGR"},
        {"channels": 1, "dtype": "float16", "scale": 1.0},
    ],
)
def test_spec_dump_validates_back_to_the_same_spec(fields: dict[str, Any]) -> None:
    original = spec(**fields)
    assert PreprocessSpec.model_validate(original.model_dump(mode="json")) == original


def test_spec_fills_the_float_default_scale_and_leaves_uint8_unscaled() -> None:
    assert spec().scale == DEFAULT_SCALE
    assert spec(dtype="uint8").scale is None


def test_sample_shape_follows_layout_channels_and_target_size() -> None:
    assert spec(size=[32, 48]).sample_shape(500, 400) == (3, 32, 48)
    assert spec(layout="NHWC", channels=1).sample_shape(500, 400) == (500, 400, 1)


@pytest.mark.parametrize(
    ("width", "height", "fields", "expected"),
    [
        # 2:1 image into a square: full width, 32 rows of padding above and below.
        (512, 256, {"size": [128, 128], "resize": "letterbox"}, ImagePlacement((128, 64), 0, 32)),
        # Portrait into landscape: full height, centred horizontally.
        (100, 200, {"size": [100, 300], "resize": "letterbox"}, ImagePlacement((50, 100), 125, 0)),
        # torchvision's Resize(256) + CenterCrop(224) on chelsea (451x300).
        (
            451,
            300,
            {"size": [224, 224], "resize": "shorter_side_center_crop", "crop_fraction": 0.875},
            ImagePlacement((385, 256), -80, -16),
        ),
        (451, 300, {"size": [10, 20]}, ImagePlacement((20, 10), 0, 0)),
        (451, 300, {}, ImagePlacement((451, 300), 0, 0)),
    ],
)
def test_placement_geometry(
    width: int, height: int, fields: dict[str, Any], expected: ImagePlacement
) -> None:
    assert placement_for(width, height, spec(**fields)) == expected


def test_letterbox_pads_with_pad_value_around_the_scaled_image() -> None:
    red = np.zeros((100, 200, 3), np.uint8)
    red[..., 0] = 200
    sample = image_to_array(
        encode(red),
        spec(size=[100, 100], resize="letterbox", pad_value=114, dtype="uint8", layout="NHWC"),
    )
    assert sample.shape == (100, 100, 3)
    assert (sample[:25] == 114).all() and (sample[75:] == 114).all()
    assert (sample[25:75, :, 0] == 200).all() and (sample[25:75, :, 1:] == 0).all()


def test_center_crop_matches_resize_then_crop_in_pillow() -> None:
    chelsea = skimage.data.chelsea()
    sample = image_to_array(
        encode(chelsea),
        spec(
            size=[224, 224],
            resize="shorter_side_center_crop",
            crop_fraction=0.875,
            dtype="uint8",
            layout="NHWC",
        ),
    )
    expected = Image.fromarray(chelsea).resize((385, 256), Image.Resampling.BILINEAR).crop((80, 16, 304, 240))
    np.testing.assert_array_equal(sample, np.asarray(expected))


def test_stretch_matches_pillow_resize() -> None:
    sample = image_to_array(
        ASTRONAUT_PNG, spec(size=[40, 60], dtype="uint8", layout="NHWC", interpolation="bicubic")
    )
    expected = Image.fromarray(skimage.data.astronaut()).resize((60, 40), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(sample, np.asarray(expected))


def test_bgr_reverses_the_channels_and_nchw_transposes_nhwc() -> None:
    base = {"size": [32, 32], "dtype": "uint8"}
    rgb_nhwc = image_to_array(ASTRONAUT_PNG, spec(**base, layout="NHWC"))
    bgr_nhwc = image_to_array(ASTRONAUT_PNG, spec(**base, layout="NHWC", channel_order="BGR"))
    rgb_nchw = image_to_array(ASTRONAUT_PNG, spec(**base))
    np.testing.assert_array_equal(bgr_nhwc, rgb_nhwc[..., ::-1])
    np.testing.assert_array_equal(rgb_nchw, rgb_nhwc.transpose(2, 0, 1))
    assert rgb_nchw.flags.c_contiguous and bgr_nhwc.flags.c_contiguous


def test_mean_and_std_apply_per_output_channel_after_scaling() -> None:
    raw = image_to_array(ASTRONAUT_PNG, spec(size=[24, 24], dtype="uint8", channel_order="BGR"))
    mean, std = (0.406, 0.456, 0.485), (0.225, 0.224, 0.229)
    sample = image_to_array(ASTRONAUT_PNG, spec(size=[24, 24], channel_order="BGR", mean=mean, std=std))
    expected = (raw.astype(np.float32) / 255 - np.array(mean, np.float32)[:, None, None]) / np.array(
        std, np.float32
    )[:, None, None]
    assert sample.dtype == np.float32
    np.testing.assert_allclose(sample, expected, rtol=1e-6, atol=1e-6)


def test_float16_output_is_the_rounded_float32_result() -> None:
    as32 = image_to_array(ASTRONAUT_PNG, spec(size=[16, 16], scale=1.0, mean=[127.5], std=[64.0]))
    as16 = image_to_array(
        ASTRONAUT_PNG, spec(size=[16, 16], scale=1.0, mean=[127.5], std=[64.0], dtype="float16")
    )
    assert as16.dtype == np.float16
    np.testing.assert_array_equal(as16, as32.astype(np.float16))


def test_without_size_the_decoded_size_is_kept() -> None:
    assert image_to_array(ASTRONAUT_PNG, spec()).shape == (3, 512, 512)


def test_grayscale_is_replicated_to_three_channels_or_kept_as_one() -> None:
    camera = encode(skimage.data.camera())
    three = image_to_array(camera, spec(size=[20, 20], dtype="uint8"))
    one = image_to_array(camera, spec(size=[20, 20], dtype="uint8", channels=1))
    assert three.shape == (3, 20, 20) and one.shape == (1, 20, 20)
    np.testing.assert_array_equal(three[0], three[1])
    np.testing.assert_array_equal(three[0], one[0])


def test_rgb_images_become_luma_with_one_channel() -> None:
    sample = image_to_array(ASTRONAUT_PNG, spec(dtype="uint8", channels=1, layout="NHWC"))
    expected = np.asarray(Image.fromarray(skimage.data.astronaut()).convert("L"))
    np.testing.assert_array_equal(sample[..., 0], expected)


def test_alpha_is_dropped_and_palette_images_decode() -> None:
    rgba = np.dstack([skimage.data.astronaut(), np.full((512, 512), 7, np.uint8)])
    sample = image_to_array(encode(rgba), spec(dtype="uint8", layout="NHWC"))
    np.testing.assert_array_equal(sample, skimage.data.astronaut())
    palette = Image.fromarray(skimage.data.astronaut()).quantize(16)
    decoded = image_to_array(encode(palette, transparency=0), spec(dtype="uint8", layout="NHWC"))
    np.testing.assert_array_equal(decoded, np.asarray(palette.convert("RGB")))


def test_sixteen_bit_png_keeps_its_top_eight_bits() -> None:
    deep = (np.arange(64 * 64, dtype=np.uint16) * 16).reshape(64, 64)
    sample = image_to_array(encode(Image.fromarray(deep)), spec(dtype="uint8", channels=1, layout="NHWC"))
    np.testing.assert_array_equal(sample[..., 0], (deep >> 8).astype(np.uint8))


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.new("RGB", (40, 20), (10, 20, 30)), "JPEG", exif=exif)
    assert image_to_array(data, spec(dtype="uint8")).shape == (3, 40, 20)


def test_jpeg_decodes_close_to_the_original_photo() -> None:
    sample = image_to_array(
        encode(skimage.data.coffee(), "JPEG", quality=95), spec(dtype="uint8", layout="NHWC")
    )
    error = np.abs(sample.astype(np.int16) - skimage.data.coffee().astype(np.int16)).mean()
    assert sample.shape == (400, 600, 3) and error < 3


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is a text file", "'cats/0001.png' is not a readable PNG or JPEG image"),
        (encode(skimage.data.astronaut(), "GIF"), "is not a readable PNG or JPEG image"),
        (ASTRONAUT_PNG[: len(ASTRONAUT_PNG) // 2], "Image 'cats/0001.png' cannot be decoded"),
    ],
)
def test_undecodable_images_name_the_member(data: bytes, message: str) -> None:
    with pytest.raises(InvalidCalibrationSet, match=message):
        image_to_array(data, spec(), name="cats/0001.png")


def test_values_outside_float16_range_are_rejected() -> None:
    with pytest.raises(InvalidCalibrationSet, match="outside the float16 range"):
        image_to_array(ASTRONAUT_PNG, spec(size=[8, 8], dtype="float16", scale=1000.0))


def test_images_over_the_pixel_bound_are_rejected_before_decoding() -> None:
    huge = encode(Image.new("1", (8200, 8200)))
    with pytest.raises(TooLarge, match="8200x8200 pixels"):
        image_to_array(huge, spec(), name="huge.png")
