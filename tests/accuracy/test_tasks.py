"""Task guessing and task metrics: what INT8 must keep, judged the way the task judges it."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from service.accuracy.outputs import AccuracyAccumulator
from service.accuracy.task_metrics import Detections, decode_detections, match_detections
from service.accuracy.tasks import AccuracyTarget, DetectionDecode, TaskSpec, guess_task


def _yolo_output(boxes: list[list[float]], scores: list[list[float]], anchors: int = 64) -> np.ndarray:
    """[1, 4 + C, anchors] with the given (cx, cy, w, h) boxes and class scores, the rest background."""
    classes = len(scores[0])
    rows = np.zeros((anchors, 4 + classes), dtype=np.float32)
    rows[:, :4] = [100.0, 100.0, 10.0, 10.0]
    for i, (box, score) in enumerate(zip(boxes, scores, strict=True)):
        rows[i, :4], rows[i, 4:] = box, score
    return rows.T[None]


def test_guess_reads_class_scores_dense_maps_and_yolo_heads() -> None:
    assert guess_task({"p": np.random.rand(4, 10).astype(np.float32)})[0].kind == "classification"
    assert guess_task({"m": np.random.rand(2, 1, 64, 64).astype(np.float32)})[0].kind == "segmentation"
    yolo = _yolo_output([[320.0, 200.0, 50.0, 80.0]], [[0.1, 0.9, 0.0]])
    spec, reason = guess_task({"det": yolo})
    assert spec.kind == "detection" and spec.detection is not None
    assert spec.detection.layout == "channels_first" and "YOLO-style" in reason
    spec, _ = guess_task({"det": np.swapaxes(yolo, 1, 2)})
    assert spec.detection is not None and spec.detection.layout == "channels_last"
    # Softmax rows of a recognizer are not boxes: per-step classification.
    steps = np.random.rand(1, 40, 97).astype(np.float32)
    assert guess_task({"rec": steps / steps.sum(-1, keepdims=True)})[0].kind == "classification"
    assert guess_task({"a": np.zeros((1, 3)), "b": np.zeros((1, 5))})[0].kind == "generic"


def test_detection_recall_and_precision_count_lost_and_invented_boxes() -> None:
    decode = DetectionDecode(layout="channels_first")
    reference = _yolo_output(
        [[100, 100, 40, 40], [300, 300, 60, 30], [500, 120, 20, 20]],
        [[0.9, 0.0], [0.0, 0.8], [0.7, 0.0]],
    )
    # INT8 keeps the first box, moves the second off, loses the third's score, invents a fourth.
    candidate = _yolo_output(
        [[102, 99, 40, 42], [420, 300, 60, 30], [500, 120, 20, 20], [50, 400, 30, 30]],
        [[0.88, 0.0], [0.0, 0.8], [0.1, 0.0], [0.0, 0.6]],
    )
    ref, cand = decode_detections({"d": reference}, decode)[0], decode_detections({"d": candidate}, decode)[0]
    assert len(ref.scores) == 3 and len(cand.scores) == 3
    assert match_detections(ref, cand, 0.5) == 1
    accumulator = AccuracyAccumulator(TaskSpec(kind="detection", detection=decode))
    accumulator.update({"d": reference}, {"d": candidate})
    task = accumulator.finish().task
    assert task is not None and task.metrics == {"detection_recall": 1 / 3, "detection_precision": 1 / 3}


def test_detection_matching_needs_the_same_class() -> None:
    box = np.array([[0.0, 0.0, 10.0, 10.0]])
    ref = Detections(box, np.array([0.9]), np.array([1]))
    assert match_detections(ref, Detections(box, np.array([0.9]), np.array([2])), 0.5) == 0
    assert match_detections(ref, Detections(box, np.array([0.9]), np.array([1])), 0.5) == 1


def test_nms_keeps_one_of_overlapping_boxes_of_a_class() -> None:
    output = _yolo_output(
        [[100, 100, 40, 40], [101, 100, 40, 40], [101, 100, 40, 40]], [[0.9, 0], [0.8, 0], [0, 0.7]]
    )
    (found,) = decode_detections({"d": output}, DetectionDecode())
    assert sorted(found.classes.tolist()) == [0, 1]


def test_a_collapsed_class_channel_shows_although_the_whole_output_cosine_stays_high() -> None:
    """The shape of the reported YOLO failure: pixel boxes dominate one cosine, scores are lost."""
    rng = np.random.default_rng(0)
    reference = np.concatenate(
        [rng.uniform(0, 320, (2, 4, 500)), rng.uniform(0, 1, (2, 3, 500)) ** 4], axis=1
    ).astype(np.float32)
    candidate = reference.copy()
    candidate[:, 4:] = 0.0  # every class score lost
    accumulator = AccuracyAccumulator(TaskSpec(kind="generic"))
    accumulator.update({"out": reference}, {"out": candidate})
    report = accumulator.finish()
    assert report.worst_cosine() > 0.99
    assert report.outputs[0].channel_axis == 1 and report.outputs[0].worst_channel in (4, 5, 6)
    assert report.worst_channel_cosine() == 0.0
    assert report.metric("worst_channel_cosine") == 0.0 and report.metric("cosine") == report.worst_cosine()


def test_classification_and_segmentation_metrics() -> None:
    reference = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]], dtype=np.float32)
    candidate = np.array([[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3]], dtype=np.float32)
    accumulator = AccuracyAccumulator(TaskSpec(kind="classification", top_k=2))
    accumulator.update({"p": reference}, {"p": candidate})
    task = accumulator.finish().task
    assert task is not None and task.metrics["top1_agreement"] == pytest.approx(1 / 3)
    assert task.metrics["top2_agreement"] == pytest.approx(3 / 3)

    ref_map = np.zeros((1, 1, 8, 8), dtype=np.float32)
    ref_map[..., :4, :4] = 0.9
    cand_map = np.zeros_like(ref_map)
    cand_map[..., :4, :2] = 0.9
    accumulator = AccuracyAccumulator(TaskSpec(kind="segmentation"))
    accumulator.update({"m": ref_map}, {"m": cand_map})
    task = accumulator.finish().task
    assert (
        task is not None
        and task.metrics["map_iou"] == pytest.approx(0.5)
        and task.metrics["threshold"] == 0.3
    )


def test_unknown_target_metrics_and_incomplete_decodes_are_rejected() -> None:
    with pytest.raises(ValidationError, match="unknown metric"):
        AccuracyTarget(metric="accuracy", min=0.9)
    with pytest.raises(ValidationError, match="boxes_output and scores_output"):
        DetectionDecode(layout="separate")
