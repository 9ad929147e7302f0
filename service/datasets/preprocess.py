"""Image preprocessing for calibration sets: how a decoded PNG/JPEG becomes one model input sample.

:class:`PreprocessSpec` is the JSON the client sends with an image archive (parsed directly by the
API, hence a pydantic model with ``extra="forbid"``). :func:`image_to_array` applies it to one image:

1. decode with Pillow (PNG and JPEG only), honour the EXIF orientation, convert to RGB (3 channels:
   grayscale is replicated, alpha is dropped) or to luma (``channels=1``);
2. resize to ``size`` = (height, width) when given: ``stretch`` ignores the aspect ratio,
   ``letterbox`` keeps it and pads with ``pad_value`` (centred), ``shorter_side_center_crop`` scales
   so the image covers ``size / crop_fraction`` and cuts out the centre (torchvision's
   Resize(256) + CenterCrop(224) is ``size=[224, 224], crop_fraction=0.875``);
3. reorder channels (``RGB`` or ``BGR``), then for float dtypes compute
   ``(pixel * scale - mean) / std`` per channel (mean/std listed in the output channel order);
   ``uint8`` output keeps raw pixels and accepts no normalization;
4. lay the sample out as ``CHW`` (``NCHW`` models) or ``HWC`` (``NHWC``), without a batch axis.

Every problem with one image raises :class:`InvalidCalibrationSet` naming the archive member.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.errors import InvalidCalibrationSet, TooLarge

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_SCALE = 1.0 / 255.0
# Largest decoded image accepted (8K x 8K): big enough for 48 MP phone photos, small enough that one
# decoded image cannot exhaust memory. Pillow's own bomb check only starts at 89 MP with a warning.
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_SIDE = 16384

Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]


@dataclass(frozen=True)
class PreprocessLimits:
    """Bounds on what preprocessing may materialise, checked before any image is decoded.

    ``sample_bytes`` bounds one output sample (ENGINE_SERVICE_MAX_PREPROCESSED_SAMPLE_BYTES) and
    ``set_bytes`` all samples together (ENGINE_SERVICE_MAX_PREPROCESSED_BYTES); None leaves one off.
    """

    sample_bytes: int | None = None
    set_bytes: int | None = None

    def check_sample(self, shape: tuple[int, ...], itemsize: int, name: str) -> None:
        size = math.prod(shape) * itemsize
        if self.sample_bytes is not None and size > self.sample_bytes:
            raise TooLarge(
                f"Preprocessing '{name}' would make a sample of shape {list(shape)} ({size} bytes), over the "
                f"limit of {self.sample_bytes} bytes per sample; pick a smaller 'size' or raise "
                "ENGINE_SERVICE_MAX_PREPROCESSED_SAMPLE_BYTES.",
                details={"limit": "max_preprocessed_sample_bytes", "limit_bytes": self.sample_bytes},
            )

    def check_set(self, count: int, shape: tuple[int, ...], itemsize: int) -> None:
        size = count * math.prod(shape) * itemsize
        if self.set_bytes is not None and size > self.set_bytes:
            raise TooLarge(
                f"{count} preprocessed images of shape {list(shape)} would take {size} bytes, over the limit "
                f"of {self.set_bytes}; send fewer images, pick a smaller 'size' or raise "
                "ENGINE_SERVICE_MAX_PREPROCESSED_BYTES.",
                details={"limit": "max_preprocessed_bytes", "limit_bytes": self.set_bytes},
            )


UNBOUNDED_PREPROCESS = PreprocessLimits()


class PreprocessSpec(BaseModel):
    """How images become model inputs. Dumps canonically: the same meaning gives the same JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: tuple[Side, Side] | None = Field(
        default=None,
        description="Target [height, width]. Omitted: keep the decoded size (every image must match).",
    )
    resize: Literal["stretch", "letterbox", "shorter_side_center_crop"] = Field(
        default="stretch",
        description="How to reach size: stretch (ignore the aspect ratio), letterbox (keep it, pad with "
        "pad_value, centred), shorter_side_center_crop (cover size / crop_fraction, cut out the centre).",
    )
    pad_value: int = Field(default=0, ge=0, le=255, description="Letterbox padding, in pixel units.")
    crop_fraction: float = Field(
        default=1.0, gt=0.0, le=1.0, description="shorter_side_center_crop: size / resized size."
    )
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = Field(
        default="bilinear", description="Resampling filter of the resize (Pillow's)."
    )
    channels: Literal[1, 3] = Field(default=3, description="3: RGB/BGR (grey replicated), 1: luma.")
    channel_order: Literal["RGB", "BGR"] = Field(
        default="RGB", description="BGR for models trained on OpenCV-decoded images."
    )
    layout: Literal["NCHW", "NHWC"] = Field(
        default="NCHW", description="Sample layout: CHW for NCHW models, HWC for NHWC ones."
    )
    dtype: Literal["float32", "float16", "uint8"] = Field(
        default="float32", description="Output dtype; uint8 keeps raw pixels (no scale, mean or std)."
    )
    scale: float | None = Field(
        default=None, description="Multiplies pixels before mean/std; default 1/255 for float dtypes."
    )
    mean: tuple[float, ...] | None = Field(default=None, description="Per output channel, after scaling.")
    std: tuple[float, ...] | None = Field(default=None, description="Per output channel, after scaling.")

    @model_validator(mode="before")
    @classmethod
    def _default_scale(cls, data: Any) -> Any:
        # Fill the float default here (not as the field default) so a uint8 spec can insist on no scale
        # and a dumped spec validates back to itself.
        if isinstance(data, dict) and data.get("scale") is None and data.get("dtype", "float32") != "uint8":
            return {**data, "scale": DEFAULT_SCALE}
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> PreprocessSpec:
        if self.size is None and self.resize != "stretch":
            raise ValueError(f"resize '{self.resize}' needs a target size; add \"size\": [height, width]")
        if self.pad_value != 0 and self.resize != "letterbox":
            raise ValueError("pad_value only applies to resize 'letterbox'")
        if self.crop_fraction != 1.0 and self.resize != "shorter_side_center_crop":
            raise ValueError("crop_fraction only applies to resize 'shorter_side_center_crop'")
        if self.dtype == "uint8":
            if self.scale is not None or self.mean is not None or self.std is not None:
                raise ValueError("dtype uint8 keeps raw pixels; remove scale, mean and std (or use float32)")
            return self
        if self.scale is None or not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError("scale must be a positive finite number")
        for label, values in (("mean", self.mean), ("std", self.std)):
            if values is None:
                continue
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"{label} needs 1 or {self.channels} values (per channel), got {len(values)}"
                )
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"{label} values must be finite")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        return self

    @property
    def itemsize(self) -> int:
        """Bytes per output value."""
        return int(np.dtype(self.dtype).itemsize)

    def sample_shape(self, height: int, width: int) -> tuple[int, ...]:
        """Per-sample output shape for a decoded image of this size (the target size when given)."""
        if self.size is not None:
            height, width = self.size
        if self.layout == "NCHW":
            return (self.channels, height, width)
        return (height, width, self.channels)

    @property
    def channel_axis(self) -> int:
        """The channel axis of a stored batch (sample axis first)."""
        return 1 if self.layout == "NCHW" else 3


@dataclass(frozen=True)
class ImagePlacement:
    """Where the scaled image lands on the target canvas: scale to ``resized`` (width, height) and
    paste with its top-left corner at (``left``, ``top``); negative offsets crop, positive ones pad.
    """

    resized: tuple[int, int]
    left: int
    top: int


def placement_for(width: int, height: int, spec: PreprocessSpec) -> ImagePlacement:
    """The placement of a ``width`` x ``height`` image under ``spec`` (identity when no size)."""
    if spec.size is None:
        return ImagePlacement((width, height), 0, 0)
    target_h, target_w = spec.size
    if spec.resize == "stretch":
        return ImagePlacement((target_w, target_h), 0, 0)
    if spec.resize == "letterbox":
        factor = min(target_w / width, target_h / height)
        new_w = min(target_w, max(1, round(width * factor)))
        new_h = min(target_h, max(1, round(height * factor)))
        return ImagePlacement((new_w, new_h), (target_w - new_w) // 2, (target_h - new_h) // 2)
    factor = max(target_w / width, target_h / height) / spec.crop_fraction
    new_w = max(target_w, round(width * factor))
    new_h = max(target_h, round(height * factor))
    return ImagePlacement((new_w, new_h), -((new_w - target_w) // 2), -((new_h - target_h) // 2))


def image_to_array(
    data: bytes, spec: PreprocessSpec, *, name: str = "image", limits: PreprocessLimits = UNBOUNDED_PREPROCESS
) -> np.ndarray:
    """One encoded PNG/JPEG as a C-contiguous sample of ``spec.sample_shape`` and ``spec.dtype``.

    Raises InvalidCalibrationSet (naming ``name``) for undecodable images or values that do not fit
    the output dtype, and TooLarge, before decoding, for images or resize steps over
    ``MAX_IMAGE_PIXELS`` and for samples over ``limits``.
    """
    image = _decoded(data, spec, name, limits)
    placement = placement_for(image.width, image.height, spec)
    image = _placed(image, placement, spec)
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if spec.channel_order == "BGR" and spec.channels == 3:
        pixels = pixels[:, :, ::-1]
    if spec.dtype == "uint8":
        values: np.ndarray = pixels
    else:
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, with a fix
            values = _normalized(pixels, spec).astype(spec.dtype)
        if not np.isfinite(values).all():
            raise InvalidCalibrationSet(
                f"Preprocessing image '{name}' produced values outside the {spec.dtype} range; "
                "lower 'scale' or use float32."
            )
    if spec.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values)


def _normalized(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    scale = spec.scale if spec.scale is not None else DEFAULT_SCALE
    values = pixels.astype(np.float32) * np.float32(scale)
    if spec.mean is not None:
        values -= np.asarray(spec.mean, dtype=np.float32)
    if spec.std is not None:
        values /= np.asarray(spec.std, dtype=np.float32)
    return values


def _decoded(data: bytes, spec: PreprocessSpec, name: str, limits: PreprocessLimits) -> Image.Image:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Oversized images are rejected below with our own bound; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise TooLarge(
                    f"Image '{name}' is {image.width}x{image.height} pixels, over the limit of "
                    f"{MAX_IMAGE_PIXELS} pixels; downscale it before uploading."
                )
            _check_output(image.width, image.height, spec, name, limits)
            image.load()
            return _converted(ImageOps.exif_transpose(image), spec.channels)
    except UnidentifiedImageError as exc:
        raise InvalidCalibrationSet(f"'{name}' is not a readable PNG or JPEG image.") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidCalibrationSet(
            f"Image '{name}' cannot be decoded ({exc}); re-encode or drop it."
        ) from exc


def _check_output(width: int, height: int, spec: PreprocessSpec, name: str, limits: PreprocessLimits) -> None:
    """Refuse, from the image header alone, a resize step or an output sample that is too large.

    EXIF rotation may swap width and height, which changes neither count checked here.
    """
    resized_w, resized_h = placement_for(width, height, spec).resized
    if resized_w * resized_h > MAX_IMAGE_PIXELS:
        raise TooLarge(
            f"Preprocessing '{name}' ({width}x{height}) would resize it to {resized_w}x{resized_h} pixels, "
            f"over the limit of {MAX_IMAGE_PIXELS}; use a smaller 'size' or a 'crop_fraction' nearer 1."
        )
    limits.check_sample(spec.sample_shape(height, width), spec.itemsize, name)


def _converted(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit PNGs: Pillow's convert() clips to 255 instead of rescaling, so keep the top 8 bits.
        from PIL import Image

        deep = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip(deep >> 8, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        # Palette images with transparency warn when converted straight to RGB; going via RGBA is exact.
        image = image.convert("RGBA")
    return image.convert("L" if channels == 1 else "RGB")


def _placed(image: Image.Image, placement: ImagePlacement, spec: PreprocessSpec) -> Image.Image:
    from PIL import Image

    if spec.size is None:
        return image
    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "lanczos": Image.Resampling.LANCZOS,
    }[spec.interpolation]
    scaled = image if placement.resized == image.size else image.resize(placement.resized, resample)
    target_h, target_w = spec.size
    if placement.resized == (target_w, target_h):
        return scaled
    fill: int | tuple[int, int, int] = spec.pad_value if spec.channels == 1 else (spec.pad_value,) * 3
    canvas = Image.new(scaled.mode, (target_w, target_h), fill)
    canvas.paste(scaled, (placement.left, placement.top))
    return canvas
