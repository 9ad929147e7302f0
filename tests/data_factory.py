"""Calibration data for tests: arrays as .npz/.npy bytes, and archives of real photos (skimage.data)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "page",
    "text",
    "camera",
    "coins",
)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def classifier_samples(count: int, *, size: int = 16, seed: int = 0) -> np.ndarray:
    """Inputs for tests.model_factory.resnet_block_classifier: smooth-ish images in [0, 1]."""
    rng = np.random.default_rng(seed)
    base = rng.random((count, 3, size // 4, size // 4), dtype=np.float32)
    return np.repeat(np.repeat(base, 4, axis=2), 4, axis=3) + 0.05 * rng.standard_normal(
        (count, 3, size, size)
    ).astype(np.float32)


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photo shipped inside scikit-image."""
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def photo_zip(count: int, *, fmt: str = "PNG", max_side: int = 160) -> bytes:
    """A zip of ``count`` real photos (cycled, randomly cropped), downscaled to keep tests fast."""
    rng = np.random.default_rng(count)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(count):
            image = Image.fromarray(photo(PHOTOS[index % len(PHOTOS)]))
            image.thumbnail((max_side, max_side))
            width, height = image.size
            left, top = int(rng.integers(0, width // 4 + 1)), int(rng.integers(0, height // 4 + 1))
            image = image.crop((left, top, left + 3 * width // 4, top + 3 * height // 4))
            encoded = io.BytesIO()
            image.save(encoded, format=fmt)
            archive.writestr(f"photos/{index:04d}.{fmt.lower().replace('jpeg', 'jpg')}", encoded.getvalue())
    return buffer.getvalue()
