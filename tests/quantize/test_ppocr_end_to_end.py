"""Trained PP-OCR models (shipped by rapidocr) quantized end to end on real photos.

Ranges here are plain max calibration over a few downscaled skimage photos (the service's entropy
calibrator lives in service/calibration); the bounds are what that crude calibration reaches, measured:
detector at 192x192, held-out photos: cosine 0.995, worst photo 0.88, 98.6% of pixels on the same side
of the 0.3 text threshold; recognizer at 48x192: cosine 0.968, per-step top-1 agreement 0.875.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from service.accuracy.outputs import evaluate_with_onnxruntime
from service.quantize.bn_fold import fold_batchnorm
from service.quantize.fp16 import fp16_model_from
from service.quantize.qdq import QdqResult
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.quantize.support import (
    amax_by_running,
    assert_tensorrt_placement,
    photo_batches,
    rapidocr_model,
    session,
)


@pytest.fixture(scope="module")
def detector() -> onnx.ModelProto:
    return fold_batchnorm(onnx.load(rapidocr_model("PP-OCRv6_det_small.onnx")))


@pytest.fixture(scope="module")
def detector_int8(detector: onnx.ModelProto) -> QdqResult:
    calibration = photo_batches((192, 192), 4)
    amax = amax_by_running(detector, tensors_to_calibrate(detector), calibration)
    return qdq_model_from_scales(detector, amax)


def test_detector_quantizes_every_conv_but_its_sigmoid_head(detector_int8: QdqResult) -> None:
    onnx.checker.check_model(detector_int8.model, full_check=True)
    assert detector_int8.kept_nodes == ("ConvTranspose.2",)
    assert len(detector_int8.quantized_nodes) == 84
    assert detector_int8.per_channel_weights == 84
    assert_tensorrt_placement(detector_int8.model, detector_int8.quantized_nodes)


def test_detector_probability_map_survives_int8(detector: onnx.ModelProto, detector_int8: QdqResult) -> None:
    held_out = photo_batches((192, 192), 2, start=4)  # the text photo and the camera man

    report = evaluate_with_onnxruntime(detector, detector_int8.model, held_out)

    assert report.worst_cosine() > 0.98
    assert report.output("fetch_name_0").worst_sample_cosine > 0.8
    text = held_out[0]
    expected = session(detector).run(None, text)[0]
    got = session(detector_int8.model).run(None, text)[0]
    assert (expected > 0.3).mean() > 0.2  # the photo really has text
    assert ((expected > 0.3) == (got > 0.3)).mean() > 0.97


def _text_line_batches() -> list[dict[str, np.ndarray]]:
    import skimage.data
    import skimage.transform

    page, text = skimage.data.page(), skimage.data.text()
    rows = [(page, 0, 40), (page, 40, 80), (page, 80, 120), (page, 120, 160), (text, 0, 60), (text, 60, 120)]
    batches = []
    for image, top, bottom in rows:
        line = np.stack([image[top:bottom]] * 3, axis=-1)
        resized = skimage.transform.resize(line, (48, 192), anti_aliasing=True)
        batches.append({"x": ((resized - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)})
    return batches


def test_recognizer_quantizes_and_types_fp16_keeping_its_softmax_head() -> None:
    recognizer = fold_batchnorm(onnx.load(rapidocr_model("PP-OCRv6_rec_small.onnx")))
    lines = _text_line_batches()
    amax = amax_by_running(recognizer, tensors_to_calibrate(recognizer), lines[:4])

    result = qdq_model_from_scales(recognizer, amax)
    hybrid = fp16_model_from(result.model)

    assert result.kept_nodes == ("MatMul.12",)  # the classifier feeding the CTC softmax
    # 9 MatMuls have constant weights; the head is one of them. The 4 attention-score MatMuls stay float.
    assert sum(n.startswith("MatMul") for n in result.quantized_nodes) == 8
    int8 = evaluate_with_onnxruntime(recognizer, result.model, lines[4:]).output("fetch_name_0")
    assert int8.cosine > 0.95 and int8.top1_agreement is not None and int8.top1_agreement > 0.8
    mixed = evaluate_with_onnxruntime(result.model, hybrid, lines[4:]).output("fetch_name_0")
    assert mixed.cosine > 0.97
