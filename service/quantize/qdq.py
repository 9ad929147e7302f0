"""Insert Q/DQ into an FP32 model from activation amax values: the explicit-quantization ONNX.

Contract: :meth:`TensorRtPlacement.qdq_model` (the service reaches it through
``targets.placement_for``) takes an FP32 model and the amax of every tensor its summary lists and
returns a :class:`QdqResult` whose model passes ``onnx.checker`` (full check), runs in ONNX Runtime
and parses in TensorRT 10/11 and TensorRT-RTX. Placement follows ``placement.py``; the encoding
follows TensorRT's expectations:

- activations: per-tensor symmetric INT8, ``scale = amax / 127``, zero point 0 (an explicit int8 zero
  point, since QuantizeLinear without one produces uint8);
- weights: pre-quantized INT8 initializers feeding a DequantizeLinear with per-output-channel scales
  (``amax_c / 127``, values clipped to [-127, 127]); TensorRT would quantize float weights behind a Q
  itself, but pre-quantizing stores a quarter of the bytes and pins the rounding, so ONNX Runtime and
  TensorRT run exactly the same integer weights;
- bias stays a float input of the layer (TensorRT-RTX rejects int32 bias behind DequantizeLinear);
- a zero amax (a tensor or channel that was all zeros in calibration) gets scale 1, which keeps every
  later value representable instead of dividing by zero;
- scales are rounded up to values FP16 represents exactly, so ``fp16.py`` can type the INT8 layers
  FP16 (DequantizeLinear then outputs FP16) without re-rounding anything;
- one QuantizeLinear per tensor and one DequantizeLinear per consuming node: the quantized tensor is
  produced once (TensorRT fuses the Q into its producer) and every consumer has a DQ of its own to
  fuse into itself (TensorRT fuses a DQ into its consumer; a DQ shared by a Conv and a residual Add
  would have to be duplicated by the optimizer first). ONNX Runtime's QDQ transformers also want one
  DQ per node unit. Measured: TensorRT-RTX 1.7 builds the same layers from a shared DQ, so this
  choice costs nothing there and spares every other consumer a duplication pass.

``target="onnxruntime"`` swaps in ONNX Runtime's strategy instead (``ort_placement.py``, ``ort_qdq.py``;
chosen in ``targets.py``): whole node units for its CPU integer kernels, uint8 activations, int32
biases. That model runs in ONNX Runtime only; TensorRT-RTX's parser rejects its int32 biases.

Models below opset 13 are upgraded with ``onnx.version_converter`` (per-channel DequantizeLinear needs
the ``axis`` attribute of opset 13); the IR version is raised to match. Tensor names survive, so amax
values collected on the original model apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import BadInput
from service.onnx_graph.graph import GraphIndex
from service.quantize.canonical import canonical_model
from service.quantize.encoding import INT8_MAX, activation_scale, quantize_weight
from service.quantize.encoding import fp16_exact_scales as fp16_exact_scales  # re-exported for fp16.py
from service.quantize.placement import (
    QDQ_MIN_OPSET,
    ActivationSite,
    PlacementSummary,
    PlacementTarget,
    QdqPlan,
    plan_qdq,
    tensorrt_summary,
)
from service.quantize.rewrite import NameAllocator, WeightedLayer, remove_unused_initializers, splice_nodes
from service.quantize.skip import SkipSpec


@dataclass(frozen=True)
class QdqResult:
    """The Q/DQ model and what went into INT8."""

    model: onnx.ModelProto
    quantized_nodes: tuple[str, ...]  # weighted layers now fed by Q/DQ, topological order
    kept_nodes: tuple[str, ...]  # weighted layers left in float (skipped, heads, no integer form)
    per_channel_weights: int  # weight tensors quantized with per-output-channel scales
    activation_tensors: tuple[str, ...] = ()  # tensors that got a QuantizeLinear


@dataclass(frozen=True)
class TensorRtPlacement:
    """The TensorRT placement strategy (see ``targets.QdqPlacement``): TensorRT 10/11 and TensorRT-RTX.

    Accuracy is measured by simulating the Q/DQ in float: the GPU's INT8 kernels compute what the
    dequantized model computes, up to rounding, and no such kernels exist on this machine.
    """

    # What the strategy is, not settings: class-level, so no instance can claim another identity.
    name: ClassVar[PlacementTarget] = "tensorrt"
    simulates_qdq: ClassVar[bool] = True
    weight_max: ClassVar[int] = INT8_MAX
    artifact_suffix: ClassVar[str] = ""

    def prepared(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return canonical_model(model, min_opset=QDQ_MIN_OPSET)

    def summary(
        self, model: onnx.ModelProto, skip: SkipSpec | None = None, *, quantize_heads: bool = False
    ) -> PlacementSummary:
        return tensorrt_summary(model, skip, quantize_heads=quantize_heads)

    def qdq_model(
        self,
        model: onnx.ModelProto,
        activation_amax: Mapping[str, float],
        *,
        skip: SkipSpec | None = None,
        quantize_heads: bool = False,
    ) -> QdqResult:
        """The Q/DQ model for TensorRT (module docstring); BadInput as ``targets.qdq_model_from_scales``."""
        work = canonical_model(model, min_opset=QDQ_MIN_OPSET)
        plan = plan_qdq(work, skip, quantize_heads=quantize_heads, ranges=activation_amax)
        amax = checked_amax(plan.tensors, activation_amax)
        scales = {tensor: activation_scale(value) for tensor, value in amax.items()}
        return checked_qdq_result(work, plan, _insert(work, plan, scales), plan.tensors)

    def non_negative_tensors(self, prepared: onnx.ModelProto, skip: SkipSpec | None = None) -> frozenset[str]:
        return frozenset()  # symmetric int8: the sign of a tensor changes nothing

    def activation_params(self, tensor: str, amax: float, *, non_negative: bool) -> tuple[float, np.ndarray]:
        return activation_scale(amax), np.array(0, dtype=np.int8)


# The default placement wherever a caller names none (immutable, so one instance serves all).
TENSORRT_PLACEMENT = TensorRtPlacement()


class PlacedLayers(Protocol):
    """What any placement's plan says about the weighted layers (``QdqPlan``, ``OrtQdqPlan``)."""

    @property
    def quantized_nodes(self) -> tuple[str, ...]: ...

    @property
    def kept_nodes(self) -> tuple[str, ...]: ...


def checked_qdq_result(
    model: onnx.ModelProto, plan: PlacedLayers, per_channel_weights: int, activation_tensors: tuple[str, ...]
) -> QdqResult:
    """The result for a model Q/DQ was just inserted into, once the ONNX checker accepts the model."""
    onnx.checker.check_model(model)
    return QdqResult(
        model=model,
        quantized_nodes=plan.quantized_nodes,
        kept_nodes=plan.kept_nodes,
        per_channel_weights=per_channel_weights,
        activation_tensors=activation_tensors,
    )


def checked_amax(tensors: Sequence[str], activation_amax: Mapping[str, float]) -> dict[str, float]:
    """The amax of each of ``tensors`` as a float; BadInput names the missing, negative or non-finite ones."""
    missing = [t for t in tensors if t not in activation_amax]
    if missing:
        shown = ", ".join(repr(t) for t in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise BadInput(
            f"no activation amax for {len(missing)} tensor(s) the Q/DQ placement needs: {shown}{more}. "
            "Calibrate the tensors listed by tensors_to_calibrate() for this model, skip list and target.",
            details={"missing_tensors": missing},
        )
    checked: dict[str, float] = {}
    invalid = []
    for tensor in tensors:
        amax = float(activation_amax[tensor])
        if not math.isfinite(amax) or amax < 0:
            invalid.append(f"{tensor!r}={amax}")
            continue
        checked[tensor] = amax
    if invalid:
        raise BadInput(
            f"activation amax values must be finite and >= 0; got {', '.join(invalid[:8])}. "
            "Recalibrate: a non-finite range means the calibration batches produced inf/NaN.",
        )
    return checked


def _insert(model: onnx.ModelProto, plan: QdqPlan, scales: Mapping[str, float]) -> int:
    """Rewrite the graph in place; return how many weight tensors got per-channel scales."""
    graph = model.graph
    index = GraphIndex(graph)
    names = NameAllocator(graph)
    before: dict[str, list[onnx.NodeProto]] = {}  # DQ nodes to emit right before a consumer
    after: dict[str, list[onnx.NodeProto]] = {}  # Q nodes to emit right after a producer ("" = start)

    for site in plan.activations:
        _plan_activation(site, scales[site.tensor], index, names, graph, before, after)

    per_channel = 0
    weight_cache: dict[tuple[str, int | None], tuple[str, str, str]] = {}
    old_weights: set[str] = set()
    for layer in plan.weights:
        key = (layer.weight, layer.axis)
        if key not in weight_cache:
            weight_cache[key] = _add_quantized_weight(layer, index, names, graph)
            per_channel += layer.axis is not None
        q_name, scale_name, zero_name = weight_cache[key]
        node = index.node(layer.node)
        dq_out = names.fresh(f"{layer.weight}_dequantized")
        dq = helper.make_node(
            "DequantizeLinear",
            [q_name, scale_name, zero_name],
            [dq_out],
            name=names.fresh(f"{layer.node}_weight_DequantizeLinear"),
        )
        if layer.axis is not None:
            dq.attribute.append(helper.make_attribute("axis", layer.axis))
        before.setdefault(layer.node, []).append(dq)
        node.input[1] = dq_out
        old_weights.add(layer.weight)

    splice_nodes(graph, before, after)
    remove_unused_initializers(graph, old_weights)
    return per_channel


def _plan_activation(
    site: ActivationSite,
    scale: float,
    index: GraphIndex,
    names: NameAllocator,
    graph: onnx.GraphProto,
    before: dict[str, list[onnx.NodeProto]],
    after: dict[str, list[onnx.NodeProto]],
) -> None:
    tensor = site.tensor
    scale_name = names.fresh(f"{tensor}_scale")
    zero_name = names.fresh(f"{tensor}_zero_point")
    graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name))
    graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int8), zero_name))
    quantized = names.fresh(f"{tensor}_quantized")
    q = helper.make_node(
        "QuantizeLinear",
        [tensor, scale_name, zero_name],
        [quantized],
        name=names.fresh(f"{tensor}_QuantizeLinear"),
    )
    producer = index.producer(tensor)
    after.setdefault(tensor if producer is not None else "", []).append(q)

    dq_for_node: dict[str, str] = {}
    for edge in site.edges:
        node = index.node(edge.node)
        if edge.node not in dq_for_node:
            dq_out = names.fresh(f"{tensor}_dequantized")
            dq = helper.make_node(
                "DequantizeLinear",
                [quantized, scale_name, zero_name],
                [dq_out],
                name=names.fresh(f"{tensor}_DequantizeLinear"),
            )
            before.setdefault(edge.node, []).append(dq)
            dq_for_node[edge.node] = dq_out
        node.input[edge.input_index] = dq_for_node[edge.node]


def _add_quantized_weight(
    layer: WeightedLayer, index: GraphIndex, names: NameAllocator, graph: onnx.GraphProto
) -> tuple[str, str, str]:
    weight = index.weight_value(layer.weight)
    quantized, scale = quantize_weight(weight, layer.axis)
    q_name = names.fresh(f"{layer.weight}_int8")
    scale_name = names.fresh(f"{layer.weight}_scale")
    zero_name = names.fresh(f"{layer.weight}_zero_point")
    zero = np.zeros(scale.shape, dtype=np.int8)
    graph.initializer.append(numpy_helper.from_array(quantized, q_name))
    graph.initializer.append(numpy_helper.from_array(scale, scale_name))
    graph.initializer.append(numpy_helper.from_array(zero, zero_name))
    return q_name, scale_name, zero_name
