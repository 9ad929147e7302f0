"""Where Q/DQ goes for ONNX Runtime's CPU provider: node units that become integer kernels.

Contract: :func:`plan_ort_qdq` reads a model prepared by ``ort_prepare.onnxruntime_prepared``
(canonical, opset >= 13, BatchNormalization and bias Adds folded into the convolutions) and returns an
:class:`OrtQdqPlan`; ``ort_qdq.py`` inserts it. Nothing here depends on calibration, so the
same plan lists the tensors to calibrate (:attr:`OrtQdqPlan.tensors_to_calibrate`) and drives insertion.

Why a second placement. TensorRT wants Q/DQ on the *inputs* of weighted layers only and fuses the rest
itself. ONNX Runtime's CPU provider only runs integer kernels for *complete node units* that its QDQ
selectors match (``onnxruntime/core/optimizer/qdq_transformer/selectors_actions``); anything else stays
a float op behind a DequantizeLinear, which is slower than plain FP32. The units this plan builds:

- **Conv -> QLinearConv**: DQ(x), DQ(per-channel int8 weight), DQ(int32 bias, scale = x_scale *
  w_scale) -> Conv -> [Relu | Clip(0, hi)] -> Q. The output Q is mandatory: a Conv without one stays
  float, so a Conv whose result is a graph output is kept in float. A following Relu/Clip(0, hi) is
  folded into the output Q by giving that Q the zero point at the bottom of its range (ORT drops the
  Relu as "made redundant by Q"); that is why the activation type is uint8 with zero point 0 for
  non-negative tensors, which also gives them 255 levels instead of 127.
- **Gemm -> QGemm**, **MatMul -> QLinearMatMul** with the same inputs; the output Q is optional
  (QGemm writes float, MatMul becomes MatMulIntegerToFloat) and is kept only when an integer unit
  reads the result. Gemm needs beta 1 and a bias of one value per output.
- **Integer regions**: from the tensors above, ops with integer kernels take over when all their
  activation inputs are already quantized: Add/Mul (QLinearAdd/QLinearMul, with a Relu folded as for
  Conv), Concat (QLinearConcat), AveragePool/GlobalAveragePool/Sigmoid/Softmax/LeakyRelu (QLinear*),
  and data-movement ops that ORT runs directly on int8 when input and output share one scale and zero
  point (MaxPool, Resize, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice, Gather, Expand,
  Tile). An op whose result no integer unit reads stays float (no requantization for nothing).
- Never: ConvTranspose (the CPU provider has no integer ConvTranspose), graph outputs, layers the
  skip list names, sigmoid/softmax heads (as in ``placement.py``), MatMuls of two activations.

A quantized tensor has one QuantizeLinear and one DequantizeLinear per integer unit reading it (ORT's
selectors want a DQ per node unit). Every reader of an integer unit's output reads through a DQ, float
ops included, since a float reader of the raw tensor would keep the producer out of its node unit;
float readers share one DQ (ORT duplicates it per reader anyway; measured: that is also why a Gelu
whose input comes out of a DQ is not fused, which costs a few elementwise passes per Gelu). Tensor
names are the model's own, so ranges collected on the FP32 model as uploaded apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from service.onnx_graph.graph import GraphIndex
from service.quantize._ranges import VALUE_MOVING_OPS, SignAnalysis, clip_bounds, upper_bound
from service.quantize._units import (
    MAX_JOIN_RANGE_RATIO,
    Edge,
    KeptLayer,
    mixed_join_reason,
    mixed_range_joins,
    reject_explicit_qdq,
    sigmoid_softmax_heads,
)
from service.quantize.rewrite import DEFAULT_DOMAINS, WeightedLayer, float_attr, weighted_layers
from service.quantize.skip import SkipSpec

# ORT runs these on int8 when the input and output Q/DQ share one scale and zero point (its "drop
# Q/DQ" rules); only input 0 carries data (the others are shapes, indices or resize parameters).
_PASS_THROUGH_OPS = VALUE_MOVING_OPS
_UNARY_OPS = frozenset({"AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid", "Softmax"})
_BINARY_OPS = frozenset({"Add", "Mul"})
_VARIADIC_OPS = frozenset({"Concat"})
_ORT_LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})


@dataclass(frozen=True)
class IntegerTensor:
    """An activation quantized once (QuantizeLinear) and read through DequantizeLinear by ``edges``.

    ``range_of`` names the tensor whose calibrated amax sets the scale: the tensor itself, or for the
    output of a data-movement op the tensor it moves (ORT requires identical scale and zero point
    on both sides). ``non_negative`` (statically known >= 0) selects zero point 0 over 255 levels;
    ``upper_bound`` is the max of a Clip folded into this Q, which the Q's range must not exceed.
    ``float_readers`` are float ops reading an integer unit's output; they share one DequantizeLinear.
    """

    tensor: str
    range_of: str
    non_negative: bool
    upper_bound: float | None
    edges: tuple[Edge, ...]  # integer units, one DequantizeLinear each
    float_readers: tuple[Edge, ...] = ()


@dataclass(frozen=True)
class IntegerLayer:
    """A weighted layer that ORT runs as QLinearConv, QGemm or QLinearMatMul/MatMulIntegerToFloat."""

    layer: WeightedLayer
    bias: str | None  # the float bias initializer, re-encoded as int32
    output: str | None  # the tensor its output Q quantizes (after a folded Relu/Clip); None: float out
    folded_activation: str | None  # the Relu/Clip node made redundant by the output Q

    @property
    def node(self) -> str:
        return self.layer.node


@dataclass(frozen=True)
class OrtQdqPlan:
    """Where Q/DQ goes in one prepared model for ONNX Runtime's CPU provider."""

    tensors: tuple[IntegerTensor, ...]  # topological order of producers
    layers: tuple[IntegerLayer, ...]
    integer_ops: tuple[str, ...]  # unweighted nodes that run on integers
    kept: tuple[KeptLayer, ...]

    @property
    def tensors_to_calibrate(self) -> tuple[str, ...]:
        """Every range source, and every quantized tensor's own range as well.

        A data-movement op's output borrows its input's scale here, but when a skip list or the
        selective search keeps that input's producer in float, the output needs a range of its own;
        collecting it now lets every such variant be built from one calibration.
        """
        return tuple(dict.fromkeys(name for t in self.tensors for name in (t.range_of, t.tensor)))

    @property
    def quantized_nodes(self) -> tuple[str, ...]:
        return tuple(layer.node for layer in self.layers)

    @property
    def kept_nodes(self) -> tuple[str, ...]:
        return tuple(layer.node for layer in self.kept)


def plan_ort_qdq(
    model: onnx.ModelProto,
    skip: SkipSpec | None = None,
    *,
    quantize_heads: bool = False,
    ranges: Mapping[str, float] | None = None,
) -> OrtQdqPlan:
    """The ONNX Runtime placement of a model from ``onnxruntime_prepared`` (see the module docstring).

    ``ranges`` (calibrated amax per tensor), when known, keep apart what must not share one scale: a
    Concat whose inputs' ranges differ more than :data:`MAX_JOIN_RANGE_RATIO` times (a detector
    head joining box coordinates in pixels with class scores in [0, 1], or box-distribution logits
    with score logits) stays float, so each input keeps its own scale up to the join, and a weighted
    layer reading such a join (directly or through data-movement ops) stays float too, since its
    input would need one scale. Without ranges the plan is the widest one, whose tensors to
    calibrate cover every narrower plan.
    """
    graph = model.graph
    reject_explicit_qdq(graph)
    index = GraphIndex(graph)
    layers = weighted_layers(index)
    skipped = skip.resolve_canonical(model) if skip is not None else frozenset()
    heads = frozenset() if quantize_heads else sigmoid_softmax_heads(layers, index)

    candidates: list[IntegerLayer] = []
    kept: list[KeptLayer] = []
    mixed = mixed_range_joins(index, ranges) if ranges is not None else {}
    for layer in layers:
        reason = _keep_reason(layer, index, skipped, heads)
        join = mixed.get(index.node(layer.node).input[0])
        if not reason and join is not None:
            reason = mixed_join_reason(join)
        if reason:
            kept.append(KeptLayer(layer.node, layer.op_type, reason))
        else:
            candidates.append(_integer_layer(layer, index))

    builder = _RegionBuilder(index, ranges)
    for unit in candidates:
        node = index.node(unit.node)
        builder.read(node.input[0], Edge(unit.node, 0))
        if unit.output is not None:
            builder.produce(unit.output, unit.output, mandatory=unit.layer.op_type == "Conv")
    builder.grow()
    builder.prune()
    builder.route_all_readers({unit.output for unit in candidates if unit.output is not None})
    final_layers = tuple(
        unit if unit.output is None or unit.output in builder.quantized else _float_output(unit)
        for unit in candidates
    )
    return OrtQdqPlan(
        tensors=builder.integer_tensors(),
        layers=final_layers,
        integer_ops=builder.integer_op_names(),
        kept=tuple(kept),
    )


def _keep_reason(
    layer: WeightedLayer, index: GraphIndex, skipped: frozenset[str], heads: frozenset[str]
) -> str:
    node = index.node(layer.node)
    if layer.node in skipped:
        return "skip"
    if layer.node in heads:
        return "sigmoid/softmax head"
    if layer.op_type not in _ORT_LAYER_OPS:
        return "ONNX Runtime's CPU provider has no integer kernel for it"
    if layer.op_type == "Conv" and _activation_output(node, index) in index.graph_outputs:
        return "its output is a graph output, which QLinearConv cannot write in float"
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias and not index.is_weight(bias):
        return f"{'QGemm' if layer.op_type == 'Gemm' else 'QLinearConv'} needs a constant bias"
    if layer.op_type == "Gemm" and bias:
        if float_attr(node, "beta", 1.0) != 1.0:
            return "QGemm needs beta 1 when there is a bias"
        if index.weight_value(bias).size != index.weight_value(layer.weight).shape[layer.axis or 0]:
            return "QGemm needs one bias value per output"
    return ""


def _integer_layer(layer: WeightedLayer, index: GraphIndex) -> IntegerLayer:
    node = index.node(layer.node)
    if layer.op_type == "MatMul" and index.weight_value(layer.weight).ndim != 2:
        layer = WeightedLayer(layer.node, layer.op_type, layer.weight, None)  # batched weights: per tensor
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    folded = _foldable_activation(node.output[0], index)
    output = folded.output[0] if folded is not None else node.output[0]
    if output in index.graph_outputs:
        return IntegerLayer(layer, bias, None, None)  # Gemm/MatMul: float output
    return IntegerLayer(layer, bias, output, folded.name if folded is not None else None)


def _float_output(unit: IntegerLayer) -> IntegerLayer:
    return IntegerLayer(unit.layer, unit.bias, None, None)


def _activation_output(node: onnx.NodeProto, index: GraphIndex) -> str:
    folded = _foldable_activation(node.output[0], index)
    return folded.output[0] if folded is not None else node.output[0]


def _foldable_activation(tensor: str, index: GraphIndex) -> onnx.NodeProto | None:
    """The Relu or Clip(0, hi) that is ``tensor``'s only reader, if a zero-point-0 Q can absorb it."""
    reader = index.sole_reader(tensor)
    if reader is None or reader.domain not in DEFAULT_DOMAINS or reader.input[0] != tensor:
        return None
    if reader.op_type == "Relu" or (reader.op_type == "Clip" and clip_bounds(reader, index)[0] == 0.0):
        return reader
    return None


class _RegionBuilder:
    """Grows integer regions from the weighted layers' tensors and prunes what no integer unit reads."""

    def __init__(self, index: GraphIndex, ranges: Mapping[str, float] | None = None) -> None:
        self.index = index
        self.ranges = ranges
        self.edges: dict[str, list[Edge]] = {}
        self.range_of: dict[str, str] = {}
        self.mandatory: set[str] = set()  # Conv outputs: QLinearConv has no float output
        self.ops: dict[str, tuple[tuple[str, ...], str]] = {}  # integer op -> (inputs read, output)
        self.op_writing: dict[str, str] = {}  # output tensor -> the integer op that writes it
        self.float_readers: dict[str, list[Edge]] = {}
        self.layer_nodes: set[str] = set()

    @property
    def quantized(self) -> set[str]:
        return set(self.range_of)

    def read(self, tensor: str, edge: Edge) -> None:
        self.range_of.setdefault(tensor, tensor)
        self.edges.setdefault(tensor, []).append(edge)
        self.layer_nodes.add(edge.node)

    def produce(self, tensor: str, range_of: str, *, mandatory: bool = False) -> None:
        # A data-movement op's output must reuse its input's scale even when a layer also reads it.
        self.range_of[tensor] = range_of
        self.edges.setdefault(tensor, [])
        if mandatory:
            self.mandatory.add(tensor)

    def grow(self) -> None:
        """One pass in graph (topological) order: an op joins when all its data inputs are quantized."""
        index = self.index
        for node in index.graph.node:
            if node.domain not in DEFAULT_DOMAINS or node.name in self.layer_nodes:
                continue
            data = self._data_inputs(node)
            if not data or not all(name in self.range_of for name in data):
                continue
            if len(node.output) != 1 or node.output[0] in index.graph_outputs:
                continue
            if node.op_type in _VARIADIC_OPS and not self._comparable([self.range_of[name] for name in data]):
                continue  # one integer scale would erase the smaller inputs: join them in float
            output = node.output[0]
            if node.op_type in _PASS_THROUGH_OPS:
                source = self.range_of[data[0]]
            else:
                folded = _foldable_activation(output, index)
                if folded is not None:
                    output = folded.output[0]
                    if output in index.graph_outputs:
                        continue
                source = output
            self.ops[node.name] = (data, output)
            self.op_writing[output] = node.name
            for slot, name in enumerate(node.input):
                if name in data:
                    self.edges[name].append(Edge(node.name, slot))
            self.produce(output, source)

    def prune(self) -> None:
        """Drop integer ops (and optional layer outputs) whose result no integer unit reads, to a fixpoint."""
        while True:
            idle = [
                tensor for tensor, edges in self.edges.items() if not edges and tensor not in self.mandatory
            ]
            if not idle:
                return
            for tensor in idle:
                del self.edges[tensor]
                del self.range_of[tensor]
                producer = self.op_writing.pop(tensor, None)
                if producer is None:
                    continue  # a Gemm/MatMul output: the layer writes float instead
                inputs, _ = self.ops.pop(producer)
                for name in inputs:
                    self.edges[name] = [e for e in self.edges[name] if e.node != producer]

    def route_all_readers(self, layer_outputs: set[str]) -> None:
        """Every reader of an integer unit's output reads it through a DQ, float ops included.

        ORT only forms the producer's node unit when its output feeds nothing but the one Q; a float
        reader left on the float tensor would keep the producer in float.
        """
        produced = layer_outputs | {output for _, output in self.ops.values()}
        for tensor in produced & set(self.edges):
            known = set(self.edges[tensor])
            self.float_readers[tensor] = [
                Edge(reader.name, slot)
                for reader in self.index.readers(tensor)
                for slot, name in enumerate(reader.input)
                if name == tensor and Edge(reader.name, slot) not in known
            ]

    def integer_tensors(self) -> tuple[IntegerTensor, ...]:
        order = {node.name: position for position, node in enumerate(self.index.graph.node)}

        def position(tensor: str) -> int:
            producer = self.index.producer(tensor)
            return order[producer.name] if producer is not None else -1

        signs = SignAnalysis(self.index)
        tensors = []
        for tensor in sorted(self.range_of, key=lambda t: (position(t), t)):
            source = self.range_of[tensor]
            edges = sorted(self.edges[tensor], key=lambda e: (order[e.node], e.input_index))
            readers = sorted(self.float_readers.get(tensor, []), key=lambda e: (order[e.node], e.input_index))
            tensors.append(
                IntegerTensor(
                    tensor=tensor,
                    range_of=source,
                    non_negative=signs.non_negative(source),
                    upper_bound=upper_bound(source, self.index),
                    edges=tuple(edges),
                    float_readers=tuple(readers),
                )
            )
        return tuple(tensors)

    def _comparable(self, sources: list[str]) -> bool:
        """True without ranges, or when the largest input range is within the ratio of the smallest."""
        if self.ranges is None or not all(name in self.ranges for name in sources):
            return True
        values = [max(float(self.ranges[name]), 1e-12) for name in sources]
        return max(values) <= MAX_JOIN_RANGE_RATIO * min(values)

    def integer_op_names(self) -> tuple[str, ...]:
        return tuple(node.name for node in self.index.graph.node if node.name in self.ops)

    def _data_inputs(self, node: onnx.NodeProto) -> tuple[str, ...]:
        """The activation inputs an integer kernel would read; () when the op has no integer kernel."""
        index = self.index
        if node.op_type in _PASS_THROUGH_OPS:
            if node.op_type == "MaxPool" and any(node.output[1:]):
                return ()  # the indices output has no quantized form
            rest = [name for name in node.input[1:] if name and not index.is_weight(name)]
            return (node.input[0],) if node.input and not rest and not index.is_weight(node.input[0]) else ()
        if node.op_type in _UNARY_OPS:
            return (node.input[0],) if not index.is_weight(node.input[0]) else ()
        if node.op_type in _BINARY_OPS:
            inputs = tuple(node.input)
            # Constants and x + x have no two-DQ node unit; both inputs must be distinct activations.
            if len(inputs) != 2 or inputs[0] == inputs[1] or any(index.is_weight(n) for n in inputs):
                return ()
            return inputs
        if node.op_type in _VARIADIC_OPS:
            inputs = tuple(node.input)
            if len(set(inputs)) != len(inputs) or any(index.is_weight(n) for n in inputs):
                return ()
            return inputs
        return ()
