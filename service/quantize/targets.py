"""Whose Q/DQ placement: one strategy per target behind one interface, chosen once from the target's name.

The user's vocabulary is a target name (``tensorrt``: TensorRT 10/11 and TensorRT-RTX; ``onnxruntime``:
ONNX Runtime's CPU integer kernels). :func:`placement_for` turns it into a :class:`QdqPlacement` at the
boundary of ``quantize/``; below it nothing compares target names. The two strategies:

- :class:`~service.quantize.qdq.TensorRtPlacement`: TensorRT's rules (``placement.py``), int8
  symmetric activations, per-channel int8 weights, float bias; accuracy is measured by simulating
  the Q/DQ in float, as a GPU computes it (``qdq.py``).
- :class:`~service.quantize.ort_qdq.OnnxRuntimePlacement`: whole node units ORT fuses into integer
  kernels (``ort_placement.py``), uint8 activations, int32 bias; accuracy is measured with ORT's own
  integer kernels (``ort_qdq.py``).

:func:`placement_for` is where the service turns a name into a strategy (``quantize/pipeline.py``
resolves it once per quantization and hands the strategy down to the search and sensitivity steps).
:func:`placement_summary`, :func:`tensors_to_calibrate` and :func:`qdq_model_from_scales` are
name-taking conveniences for direct callers (tests, benchmarks): each resolves the strategy and asks it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx

from service.errors import BadInput
from service.quantize.ort_qdq import OnnxRuntimePlacement
from service.quantize.placement import PlacementSummary, PlacementTarget
from service.quantize.qdq import QdqResult, TensorRtPlacement
from service.quantize.skip import SkipSpec

PLACEMENT_TARGETS: tuple[PlacementTarget, ...] = ("tensorrt", "onnxruntime")


class QdqPlacement(Protocol):
    """One target's Q/DQ placement: what to calibrate, where Q/DQ goes, how accuracy is measured."""

    @property
    def name(self) -> PlacementTarget: ...

    @property
    def simulates_qdq(self) -> bool:
        """True when accuracy is measured by running the Q/DQ model in float (quantize, then dequantize,
        as a GPU computes it); False when ONNX Runtime runs it with the target's own integer kernels."""
        ...

    @property
    def artifact_suffix(self) -> str:
        """Added to the stored Q/DQ model's file name: "" for TensorRT's, which any runtime reads;
        "-onnxruntime" for ONNX Runtime's, whose int32 biases TensorRT's parser rejects."""
        ...

    @property
    def weight_max(self) -> int:
        """The weights' integer range (127; 64 for ONNX Runtime on CPUs whose U8S8 kernels saturate)."""
        ...

    def prepared(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The canonical copy of ``model`` this placement names its layers and tensors in."""
        ...

    def summary(
        self, model: onnx.ModelProto, skip: SkipSpec | None = None, *, quantize_heads: bool = False
    ) -> PlacementSummary:
        """What the placement does with ``model`` (any FP32 model), known before calibration."""
        ...

    def qdq_model(
        self,
        model: onnx.ModelProto,
        activation_amax: Mapping[str, float],
        *,
        skip: SkipSpec | None = None,
        quantize_heads: bool = False,
    ) -> QdqResult:
        """The Q/DQ model from the amax of every tensor :meth:`summary` lists (BadInput names gaps)."""
        ...

    def non_negative_tensors(self, prepared: onnx.ModelProto, skip: SkipSpec | None = None) -> frozenset[str]:
        """Tensors of :meth:`prepared`'s model the encoding treats as >= 0 (zero point 0 on uint8)."""
        ...

    def activation_params(self, tensor: str, amax: float, *, non_negative: bool) -> tuple[float, np.ndarray]:
        """The scale and zero point (a numpy scalar of the activation type) for one activation range."""
        ...


def check_target(target: str) -> PlacementTarget:
    """``target`` itself when it names a placement; BadInput listing the placements otherwise."""
    if target not in PLACEMENT_TARGETS:
        raise BadInput(f"unknown Q/DQ placement target {target!r}; use one of {', '.join(PLACEMENT_TARGETS)}")
    return target  # type: ignore[return-value]


def placement_for(target: str, *, ort_weight_max: int | None = None) -> QdqPlacement:
    """The placement strategy ``target`` names; BadInput for an unknown name.

    ``ort_weight_max`` is the ONNX Runtime placement's weight range; None: this host's (see
    ``backends/cpu_isa.py``), so a model quantized here computes exactly on this CPU.
    """
    if check_target(target) == "onnxruntime":
        return OnnxRuntimePlacement(configured_weight_max=ort_weight_max)
    return TensorRtPlacement()


def placement_summary(
    model: onnx.ModelProto,
    skip: SkipSpec | None = None,
    *,
    quantize_heads: bool = False,
    target: PlacementTarget = "tensorrt",
) -> PlacementSummary:
    """The placement for ``target`` of ``model`` (any FP32 model; it is canonicalized here)."""
    return placement_for(target).summary(model, skip, quantize_heads=quantize_heads)


def tensors_to_calibrate(
    model: onnx.ModelProto,
    skip: SkipSpec | None = None,
    *,
    quantize_heads: bool = False,
    target: PlacementTarget = "tensorrt",
) -> list[str]:
    """The activation tensors whose amax :func:`qdq_model_from_scales` needs.

    For the ``tensorrt`` target these are the inputs of the quantized layers plus the inputs of any
    Concat such an input comes from (a layer reading a join of far-apart ranges then stays float).

    Names refer to tensors of ``model`` itself (canonicalization, the opset upgrade and the folding of
    BatchNormalization and constants keep tensor names), so they can be collected on the FP32 model as
    uploaded or after BN folding. Order: topological, by first reader. The ``onnxruntime`` target also
    needs the ranges of layer outputs (its integer kernels requantize their results), see
    ``ort_placement.py``.
    """
    summary = placement_summary(model, skip, quantize_heads=quantize_heads, target=target)
    return list(summary.tensors_to_calibrate)


def qdq_model_from_scales(
    model: onnx.ModelProto,
    activation_amax: Mapping[str, float],
    *,
    skip: SkipSpec | None = None,
    quantize_heads: bool = False,
    target: PlacementTarget = "tensorrt",
    ort_weight_max: int | None = None,
) -> QdqResult:
    """The explicitly quantized model for ``model`` given per-tensor activation amax values.

    ``target`` picks the placement (module docstring): ``tensorrt`` gives a model for TensorRT 10/11 and
    TensorRT-RTX (``qdq.py``); ``onnxruntime`` one for ONNX Runtime only, BatchNormalization folded first
    (its int32 biases are rejected by TensorRT-RTX's parser). Raises BadInput when an amax the placement
    needs is missing, negative or not finite (naming the tensors), when ``skip`` names unknown nodes,
    when the model already contains Q/DQ, or for an unknown target. ``ort_weight_max``: see
    :func:`placement_for`.
    """
    placement = placement_for(target, ort_weight_max=ort_weight_max)
    return placement.qdq_model(model, activation_amax, skip=skip, quantize_heads=quantize_heads)
