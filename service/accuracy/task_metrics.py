"""Task metrics of a candidate (INT8) against FP32, streamed batch by batch (see ``tasks.py``).

:class:`TaskAccumulator` is fed the reference and candidate outputs of each held-out batch and keeps
only counts, so memory does not grow with the number of batches. ``finish()`` returns
:class:`TaskMetrics`: the task (named or guessed, with the reason), its metrics and the lead one.

Detection: both sides are decoded the same way (score = best class probability, class = its index,
boxes converted to corners), filtered by ``score_threshold``, then class-wise NMS at ``nms_iou``
keeps at most ``max_detections`` per image. Matching is greedy by FP32 score: each FP32 detection takes
the unmatched INT8 detection of the same class with the highest IoU, if that IoU exceeds
``match_iou``. Recall = matched / FP32 detections, precision = matched / INT8 detections.

Scores near the threshold jitter under any quantization; a box FP32 scores 0.26 and INT8 0.24 is
the same answer, not a lost one. So for recall the INT8 side is decoded at ``score_threshold * (1 -
score_margin)`` and for precision the FP32 side is; the counted detections themselves always use
``score_threshold``. A collapsed score (0.9 -> 0.05) is still lost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.accuracy.tasks import PRIMARY_METRIC, DetectionDecode, TaskSpec, segmentation_threshold
from service.errors import BadInput


@dataclass(frozen=True)
class TaskMetrics:
    """The task metric of one candidate: what was judged, how, and the numbers."""

    task: TaskSpec
    guessed: bool
    reason: str
    metrics: dict[str, float | None]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def primary(self) -> str:
        return PRIMARY_METRIC[self.task.kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.task.kind,
            "primary_metric": self.primary,
            "primary_value": self.metrics.get(self.primary),
            "guessed": self.guessed,
            "reason": self.reason,
            "metrics": dict(self.metrics),
            "counts": dict(self.counts),
            "spec": self.task.model_dump(exclude_none=True),
        }


class TaskAccumulator:
    """Streams (reference, candidate) output batches into the metrics of one task."""

    def __init__(self, task: TaskSpec, *, guessed: bool, reason: str) -> None:
        self.task, self.guessed, self.reason = task, guessed, reason
        self._rows = self._top1 = self._topk = 0
        self._topk_trivial = False  # k >= classes: every row "agrees", so the figure says nothing
        self._ref_dets = self._cand_dets = self._matched = self._cand_matched = 0
        self._intersection = self._union = 0
        self._threshold: float | None = None

    def update(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        kind = self.task.kind
        if kind == "classification":
            name = self._output(reference)
            self._classify(np.asarray(reference[name]), np.asarray(candidate[name]))
        elif kind == "segmentation":
            name = self._output(reference)
            self._segment(np.asarray(reference[name]), np.asarray(candidate[name]))
        elif kind == "detection":
            decode = self.task.detection or DetectionDecode()
            lenient = decode.model_copy(
                update={"score_threshold": decode.score_threshold * (1 - decode.score_margin)}
            )
            ref_strict, cand_strict = (
                decode_detections(reference, decode),
                decode_detections(candidate, decode),
            )
            ref_lenient, cand_lenient = (
                decode_detections(reference, lenient),
                decode_detections(candidate, lenient),
            )
            for ref, cand, ref_any, cand_any in zip(
                ref_strict, cand_strict, ref_lenient, cand_lenient, strict=True
            ):
                self._ref_dets += len(ref.scores)
                self._cand_dets += len(cand.scores)
                self._matched += match_detections(ref, cand_any, decode.match_iou)
                self._cand_matched += match_detections(cand, ref_any, decode.match_iou)

    def finish(self) -> TaskMetrics:
        kind = self.task.kind
        metrics: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        if kind == "classification":
            metrics = {
                "top1_agreement": self._top1 / self._rows if self._rows else None,
                f"top{self.task.top_k}_agreement": self._topk / self._rows
                if self._rows and not self._topk_trivial
                else None,
            }
            if self.task.top_k != 5:
                metrics["top5_agreement"] = None
            counts = {"rows": self._rows}
        elif kind == "detection":
            metrics = {
                "detection_recall": self._matched / self._ref_dets if self._ref_dets else None,
                "detection_precision": self._cand_matched / self._cand_dets if self._cand_dets else None,
            }
            if self._ref_dets and not self._cand_dets:
                metrics["detection_precision"] = 0.0
            counts = {
                "reference_detections": self._ref_dets,
                "candidate_detections": self._cand_dets,
                "reference_found_again": self._matched,
                "candidate_matched": self._cand_matched,
            }
        elif kind == "segmentation":
            metrics = {"map_iou": self._intersection / self._union if self._union else 1.0}
            counts = {"reference_positive_or_union_pixels": self._union}
            if self._threshold is not None:
                metrics["threshold"] = self._threshold
        return TaskMetrics(self.task, self.guessed, self.reason, metrics, counts)

    def _output(self, outputs: Mapping[str, np.ndarray]) -> str:
        name = self.task.output or next(iter(outputs))
        if name not in outputs:
            raise BadInput(
                f"task output {name!r} is not an output of the model; outputs are {sorted(outputs)}"
            )
        return name

    def _classify(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref_rows = ref.reshape(-1, ref.shape[-1])
        cand_rows = cand.reshape(-1, cand.shape[-1])
        best = np.argmax(np.nan_to_num(ref_rows, nan=-np.inf), axis=-1)
        cand_scores = np.nan_to_num(cand_rows, nan=-np.inf)
        self._topk_trivial = self._topk_trivial or self.task.top_k >= cand_rows.shape[-1]
        k = min(self.task.top_k, cand_rows.shape[-1])
        top_k = np.argpartition(-cand_scores, k - 1, axis=-1)[:, :k]
        self._rows += int(best.size)
        self._top1 += int(np.count_nonzero(np.argmax(cand_scores, axis=-1) == best))
        self._topk += int(np.count_nonzero((top_k == best[:, None]).any(axis=-1)))

    def _segment(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.ndim == 4 and ref.shape[1] > 1:
            ref_cls, cand_cls = np.argmax(ref, axis=1), np.argmax(cand, axis=1)
            for label in np.unique(ref_cls):
                if label == 0:
                    continue  # class 0 is background by convention
                r, c = ref_cls == label, cand_cls == label
                self._intersection += int(np.count_nonzero(r & c))
                self._union += int(np.count_nonzero(r | c))
            return
        if self._threshold is None:
            self._threshold = segmentation_threshold(self.task, ref)
        r, c = ref > self._threshold, cand > self._threshold
        self._intersection += int(np.count_nonzero(r & c))
        self._union += int(np.count_nonzero(r | c))


@dataclass(frozen=True)
class Detections:
    """One image's detections after threshold and NMS: corners ``[K, 4]``, scores, classes."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def decode_detections(outputs: Mapping[str, np.ndarray], decode: DetectionDecode) -> list[Detections]:
    """Per image of the batch, the detections the outputs encode (see the module docstring)."""
    if decode.layout == "separate":
        assert decode.boxes_output is not None and decode.scores_output is not None  # validated by the spec
        boxes, scores = _output(outputs, decode.boxes_output), _output(outputs, decode.scores_output)
        if scores.shape[1] != boxes.shape[1]:
            scores = np.swapaxes(scores, 1, 2)  # [N, C, anchors] -> [N, anchors, C]
    else:
        combined = _output(outputs, decode.output or next(iter(outputs)))
        if combined.ndim != 3:
            raise BadInput(
                f"a {decode.layout} detection output must be [N, ...] of rank 3; got {combined.shape}"
            )
        rows = np.swapaxes(combined, 1, 2) if decode.layout == "channels_first" else combined
        boxes, scores = rows[..., :4], rows[..., 4:]
    if scores.shape[-1] < 1:
        raise BadInput("the detection output has no score channels after the 4 box coordinates")
    result = []
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        classes = np.argmax(image_scores, axis=-1)
        best = np.take_along_axis(image_scores, classes[:, None], axis=-1)[:, 0]
        keep = np.flatnonzero(np.nan_to_num(best, nan=-1.0) > decode.score_threshold)
        corners = _corners(image_boxes[keep].astype(np.float64), decode.box_format)
        chosen = _nms(corners, best[keep].astype(np.float64), classes[keep], decode.nms_iou)
        chosen = chosen[: decode.max_detections]
        result.append(Detections(corners[chosen], best[keep][chosen], classes[keep][chosen]))
    return result


def match_detections(reference: Detections, candidate: Detections, match_iou: float) -> int:
    """How many reference detections find an unmatched candidate of the same class with IoU > match_iou."""
    if not len(reference.scores) or not len(candidate.scores):
        return 0
    iou = box_iou(reference.boxes, candidate.boxes)
    iou[reference.classes[:, None] != candidate.classes[None, :]] = 0.0
    taken = np.zeros(len(candidate.scores), dtype=bool)
    matched = 0
    for row in np.argsort(-reference.scores, kind="stable"):
        options = np.where(taken, 0.0, iou[row])
        best = int(np.argmax(options))
        if options[best] > match_iou:
            taken[best] = True
            matched += 1
    return matched


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every corner box in ``a`` [K, 4] with every one in ``b`` [M, 4]."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0.0, None), axis=-1)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=-1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _output(outputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in outputs:
        raise BadInput(
            f"detection output {name!r} is not an output of the model; outputs are {sorted(outputs)}"
        )
    return np.asarray(outputs[name])


def _corners(boxes: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return boxes
    centre, size = boxes[:, :2], boxes[:, 2:]
    return np.concatenate([centre - size / 2.0, centre + size / 2.0], axis=1)


def _nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_limit: float) -> np.ndarray:
    """Indices kept by class-wise greedy NMS, best score first."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    suppressed = np.zeros(len(scores), dtype=bool)
    for position, index in enumerate(order):
        if suppressed[index]:
            continue
        kept.append(int(index))
        rest = order[position + 1 :]
        rest = rest[(classes[rest] == classes[index]) & ~suppressed[rest]]
        if rest.size:
            overlap = box_iou(boxes[index : index + 1], boxes[rest])[0]
            suppressed[rest[overlap > iou_limit]] = True
    return np.asarray(kept, dtype=np.int64)
