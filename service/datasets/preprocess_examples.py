"""Worked :class:`~service.datasets.preprocess.PreprocessSpec` examples, one per common model family.

They are published where the spec is documented (the OpenAPI form field, ``--help`` of the CLI commands
that take ``--preprocess``, the README) and every one is checked against the spec by the tests, so the
documentation cannot drift from what the service accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class PreprocessExample:
    """One family's preprocessing: a title, what it matches upstream, and the JSON value to send."""

    key: str
    title: str
    explanation: str
    spec: dict[str, Any]


PREPROCESS_EXAMPLES: tuple[PreprocessExample, ...] = (
    PreprocessExample(
        key="imagenet_classifier",
        title="ImageNet classifier (ResNet, MobileNet, EfficientNet from torchvision)",
        explanation="torchvision's Resize(256) + CenterCrop(224), RGB scaled to [0, 1], ImageNet mean/std, "
        "NCHW float32.",
        spec={
            "size": [224, 224],
            "resize": "shorter_side_center_crop",
            "crop_fraction": 0.875,
            "interpolation": "bilinear",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        },
    ),
    PreprocessExample(
        key="yolo_letterbox",
        title="YOLO detector (YOLOv5 / YOLOv8, 640x640)",
        explanation="Ultralytics' letterbox: keep the aspect ratio, pad with grey 114, RGB scaled to [0, 1], "
        "no mean/std, NCHW float32.",
        spec={"size": [640, 640], "resize": "letterbox", "pad_value": 114},
    ),
    PreprocessExample(
        key="ppocr_detector",
        title="PP-OCR text detector (DBNet, as RapidOCR feeds it)",
        explanation="BGR channel order (OpenCV decoding), scaled to [0, 1], mean 0.5 and std 0.5 per "
        "channel; a fixed 736x736 input (side a multiple of 32).",
        spec={
            "size": [736, 736],
            "resize": "stretch",
            "channel_order": "BGR",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    ),
)


def openapi_examples() -> dict[str, dict[str, Any]]:
    """The examples as an OpenAPI ``examples`` map (summary, description, value)."""
    return {
        example.key: {"summary": example.title, "description": example.explanation, "value": example.spec}
        for example in PREPROCESS_EXAMPLES
    }


FIELDS_HELP = (
    "size (height, width); resize stretch | letterbox | shorter_side_center_crop; pad_value 0-255 "
    "(letterbox); crop_fraction (0, 1] (center crop); interpolation nearest | bilinear | bicubic | "
    "lanczos; channels 1 | 3; channel_order RGB | BGR; layout NCHW | NHWC; dtype float32 | float16 | "
    "uint8; scale (default 1/255); mean, std (per output channel, after scaling)."
)


def cli_help(what: str = "images") -> str:
    """Help text of a ``--preprocess`` option: the fields, then one JSON example per family."""
    examples = " ".join(f"{example.key}: {json.dumps(example.spec)}." for example in PREPROCESS_EXAMPLES)
    return (
        f"PreprocessSpec JSON (or @file.json) for {what}. Fields: {FIELDS_HELP} "
        f"Examples, {examples} README.md#preprocessing explains them."
    )
