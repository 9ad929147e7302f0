"""Insert the ONNX Runtime placement (``ort_placement.py``) into a prepared model.

Contract: :func:`insert_ort_qdq` rewrites a model prepared by ``ort_placement.onnxruntime_prepared``
in place, given the :class:`~service.quantize.ort_placement.OrtQdqPlan` for it and one checked amax
per tensor the plan calibrates, and returns how many weights got per-channel scales. The encodings:

- activations: uint8 by default (see :data:`DEFAULT_ACTIVATION_TYPE`), zero point 0 over [0, amax] for
  tensors known to be >= 0, symmetric around 128 otherwise (``encoding.ort_activation_encoding``); a
  data-movement op's output reuses its input's scale and zero point initializers, since ORT only runs
  such ops on integers when both sides match exactly;
- weights: the same per-output-channel symmetric INT8 values as the TensorRT placement
  (``encoding.quantize_weight``); QLinearConv/QGemm/QLinearMatMul take uint8 activations with int8
  weights (MLAS's U8S8 kernels);
- bias: int32 at ``input_scale * weight_scale`` behind its own DequantizeLinear (per channel, axis 0),
  which ORT's Conv and Gemm selectors require (a float bias keeps the whole node unit in float).

Measured on this project's CPU (AMD EPYC, AVX-512 VNNI) with ONNX Runtime 1.31, uint8 activations ran
as fast as or faster than int8 (benchmarks/results/ort_int8_placement.md); MLAS's x86 kernels are
built around U8S8. CPUs without VNNI (AVX2, AVX-512 without VNNI) add u8 x s8 product pairs in
saturating 16-bit lanes, so there the weights get 7 bits (``weight_max`` 64, chosen from the CPU's
integer class in ``backends/cpu_isa.py``): every pair then fits and the engine computes the same
integers on every CPU of its class, which is part of its engine key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.backends.cpu_isa import host_int8_weight_max
from service.onnx_graph.graph import GraphIndex
from service.quantize.encoding import (
    INT8_MAX,
    ActivationEncoding,
    ActivationType,
    int32_bias,
    ort_activation_encoding,
    quantize_weight,
)
from service.quantize.ort_placement import IntegerLayer, IntegerTensor, OrtQdqPlan, plan_ort_qdq
from service.quantize.ort_prepare import onnxruntime_prepared
from service.quantize.placement import PlacementSummary, PlacementTarget
from service.quantize.qdq import QdqResult, checked_amax, checked_qdq_result
from service.quantize.rewrite import NameAllocator, remove_unused_initializers, splice_nodes
from service.quantize.skip import SkipSpec

DEFAULT_ACTIVATION_TYPE: ActivationType = "uint8"


@dataclass(frozen=True)
class OnnxRuntimePlacement:
    """The ONNX Runtime placement strategy (see ``targets.QdqPlacement``): its CPU integer kernels.

    Accuracy is measured with ONNX Runtime's own integer kernels running the Q/DQ model, which is the
    engine itself, so nothing is simulated. ``configured_weight_max`` None means this host's range.
    """

    configured_weight_max: int | None = None
    name: ClassVar[PlacementTarget] = "onnxruntime"
    simulates_qdq: ClassVar[bool] = False
    artifact_suffix: ClassVar[str] = "-onnxruntime"  # its Q/DQ models run on ONNX Runtime only

    @property
    def weight_max(self) -> int:
        if self.configured_weight_max is not None:
            return self.configured_weight_max
        return host_int8_weight_max()

    def prepared(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return onnxruntime_prepared(model)

    def summary(
        self, model: onnx.ModelProto, skip: SkipSpec | None = None, *, quantize_heads: bool = False
    ) -> PlacementSummary:
        plan = plan_ort_qdq(onnxruntime_prepared(model), skip, quantize_heads=quantize_heads)
        return PlacementSummary(
            target=self.name,
            tensors_to_calibrate=plan.tensors_to_calibrate,
            quantized=tuple(unit.layer for unit in plan.layers),
            kept=plan.kept,
        )

    def qdq_model(
        self,
        model: onnx.ModelProto,
        activation_amax: Mapping[str, float],
        *,
        skip: SkipSpec | None = None,
        quantize_heads: bool = False,
    ) -> QdqResult:
        """The Q/DQ model for ONNX Runtime, BatchNormalization folded first (``ort_prepare.py``)."""
        work = onnxruntime_prepared(model)
        plan = plan_ort_qdq(work, skip, quantize_heads=quantize_heads, ranges=activation_amax)
        amax = checked_amax(plan.tensors_to_calibrate, activation_amax)
        per_channel = insert_ort_qdq(work, plan, amax, weight_max=self.weight_max)
        return checked_qdq_result(work, plan, per_channel, tuple(site.tensor for site in plan.tensors))

    def non_negative_tensors(self, prepared: onnx.ModelProto, skip: SkipSpec | None = None) -> frozenset[str]:
        return frozenset(site.tensor for site in plan_ort_qdq(prepared, skip).tensors if site.non_negative)

    def activation_params(self, tensor: str, amax: float, *, non_negative: bool) -> tuple[float, np.ndarray]:
        chosen = ort_activation_encoding(
            amax, non_negative=non_negative, upper_bound=None, activation_type=DEFAULT_ACTIVATION_TYPE
        )
        return chosen.scale, chosen.numpy_zero_point()


def insert_ort_qdq(
    model: onnx.ModelProto,
    plan: OrtQdqPlan,
    activation_amax: Mapping[str, float],
    *,
    activation_type: ActivationType = DEFAULT_ACTIVATION_TYPE,
    weight_max: int = INT8_MAX,
) -> int:
    """Rewrite ``model`` in place as the plan says; return how many weights got per-channel scales.

    ``weight_max`` is the weights' integer range: 127, or 64 for CPUs whose U8S8 kernels saturate.
    """
    graph = model.graph
    index = GraphIndex(graph)
    names = NameAllocator(graph)
    before: dict[str, list[onnx.NodeProto]] = {}  # nodes to emit right before a node (by name)
    after: dict[str, list[onnx.NodeProto]] = {}  # nodes to emit right after a tensor's producer ("" = start)

    layer_inputs = {unit.node: index.node(unit.node).input[0] for unit in plan.layers}
    encodings: dict[str, ActivationEncoding] = {}
    params: dict[str, tuple[str, str]] = {}  # range source -> (scale, zero point) initializer names
    for site in plan.tensors:
        encodings[site.tensor] = ort_activation_encoding(
            activation_amax[site.range_of],
            non_negative=site.non_negative,
            upper_bound=site.upper_bound,
            activation_type=activation_type,
        )
        # Tensors sharing a range source (a data-movement op's input and output) must share the very
        # same scale and zero point initializers.
        if site.range_of not in params:
            params[site.range_of] = _add_params(graph, names, site.range_of, encodings[site.tensor])
        _quantize_tensor(site, params[site.range_of], index, names, before, after)

    per_channel = 0
    stale: set[str] = set()
    for unit in plan.layers:
        input_encoding = encodings[layer_inputs[unit.node]]
        per_channel += _quantize_layer(unit, input_encoding, index, names, graph, before, weight_max)
        stale.update(name for name in (unit.layer.weight, unit.bias) if name)

    splice_nodes(graph, before, after)
    remove_unused_initializers(graph, stale)
    return per_channel


def _add_params(
    graph: onnx.GraphProto, names: NameAllocator, tensor: str, encoding: ActivationEncoding
) -> tuple[str, str]:
    scale_name = names.fresh(f"{tensor}_scale")
    zero_name = names.fresh(f"{tensor}_zero_point")
    graph.initializer.append(numpy_helper.from_array(np.array(encoding.scale, dtype=np.float32), scale_name))
    graph.initializer.append(numpy_helper.from_array(encoding.numpy_zero_point(), zero_name))
    return scale_name, zero_name


def _quantize_tensor(
    site: IntegerTensor,
    params: tuple[str, str],
    index: GraphIndex,
    names: NameAllocator,
    before: dict[str, list[onnx.NodeProto]],
    after: dict[str, list[onnx.NodeProto]],
) -> None:
    scale_name, zero_name = params
    quantized = names.fresh(f"{site.tensor}_quantized")
    q = helper.make_node(
        "QuantizeLinear",
        [site.tensor, scale_name, zero_name],
        [quantized],
        name=names.fresh(f"{site.tensor}_QuantizeLinear"),
    )
    after.setdefault(site.tensor if index.producer(site.tensor) is not None else "", []).append(q)
    dequantized: dict[str, str] = {}  # reading node -> its DQ output
    shared = ""  # the one DQ output every float reader shares
    for edge in (*site.edges, *site.float_readers):
        is_float = edge in site.float_readers
        out = shared if is_float else dequantized.get(edge.node, "")
        if not out:
            out = names.fresh(f"{site.tensor}_dequantized")
            # Emitted before the first reader in graph order, so every reader comes after it.
            first = site.float_readers[0].node if is_float else edge.node
            before.setdefault(first, []).append(
                helper.make_node(
                    "DequantizeLinear",
                    [quantized, scale_name, zero_name],
                    [out],
                    name=names.fresh(f"{site.tensor}_DequantizeLinear"),
                )
            )
            if is_float:
                shared = out
            else:
                dequantized[edge.node] = out
        index.node(edge.node).input[edge.input_index] = out


def _quantize_layer(
    unit: IntegerLayer,
    input_encoding: ActivationEncoding,
    index: GraphIndex,
    names: NameAllocator,
    graph: onnx.GraphProto,
    before: dict[str, list[onnx.NodeProto]],
    weight_max: int,
) -> int:
    """Weight DQ (and int32 bias DQ) for one layer; returns 1 when the weight is per channel."""
    layer = unit.layer
    node = index.node(layer.node)
    values, weight_scale = quantize_weight(index.weight_value(layer.weight), layer.axis, qmax=weight_max)
    node.input[1] = _dequantized_constant(
        graph, names, before, layer.node, f"{layer.weight}_int8", values, weight_scale, layer.axis
    )
    if unit.bias is not None:
        bias_values, bias_scale = int32_bias(
            index.weight_value(unit.bias), input_encoding.scale, weight_scale
        )
        node.input[2] = _dequantized_constant(
            graph, names, before, layer.node, f"{unit.bias}_int32", bias_values.reshape(-1),
            bias_scale.reshape(-1) if bias_scale.ndim else bias_scale, 0 if bias_scale.ndim else None,
        )  # fmt: skip
    return int(layer.axis is not None)


def _dequantized_constant(
    graph: onnx.GraphProto,
    names: NameAllocator,
    before: dict[str, list[onnx.NodeProto]],
    consumer: str,
    base: str,
    values: np.ndarray,
    scale: np.ndarray,
    axis: int | None,
) -> str:
    """Add integer ``values`` with their scales and a zero-point-0 DequantizeLinear before ``consumer``."""
    value_name = names.fresh(base)
    scale_name = names.fresh(f"{base}_scale")
    zero_name = names.fresh(f"{base}_zero_point")
    graph.initializer.append(numpy_helper.from_array(values, value_name))
    graph.initializer.append(numpy_helper.from_array(np.asarray(scale, dtype=np.float32), scale_name))
    graph.initializer.append(
        numpy_helper.from_array(np.zeros(np.shape(scale), dtype=values.dtype), zero_name)
    )
    out = names.fresh(f"{base}_dequantized")
    dq = helper.make_node(
        "DequantizeLinear",
        [value_name, scale_name, zero_name],
        [out],
        name=names.fresh(f"{base}_DequantizeLinear"),
    )
    if axis is not None:
        dq.attribute.append(helper.make_attribute("axis", axis))
    before.setdefault(consumer, []).append(dq)
    return out
