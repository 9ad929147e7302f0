"""Where Q/DQ goes: TensorRT's placement rules applied to one FP32 graph.

Contract: :func:`plan_qdq` reads a canonical model (``canonical.canonical_model`` at opset >= 13) and
returns a :class:`QdqPlan`; nothing is inserted here (that is ``qdq.py``), so the same plan answers
:func:`tensorrt_summary` (the tensors to calibrate) before calibration and drives the insertion after
it. This is the TensorRT strategy's half; ``targets.py`` chooses between it and ONNX Runtime's.

The rules, from TensorRT's explicit-quantization guide and the measured facts in the design:

1. Every *weighted layer* (Conv, ConvTranspose, Gemm, MatMul with a float32 constant weight, see
   ``rewrite.WeightedLayer``) runs in INT8 unless kept: its data input gets a per-tensor activation
   Q/DQ and its weight a per-output-channel DQ. Bias stays float. MatMuls of two activations
   (attention scores) stay float: the softmax probabilities they consume lose their small values to
   a per-tensor INT8 grid.
2. Kept layers: those a :class:`~service.quantize.skip.SkipSpec` names, and *sigmoid/softmax heads*
   (unless ``quantize_heads``): a weighted layer from which a Sigmoid, Softmax or LogSoftmax is
   reached through unweighted ops only, and from there a graph output. The design measured an INT8
   detector head destroying its probability map; the last layer is cheap to keep.
3. Residual Add/Sum (two activation inputs): when an input comes from an INT8 weighted layer through
   only constant scale/bias ops and at most one BatchNormalization (looking through Identity and
   inference Dropout), each intermediate with a single reader, TensorRT can fuse the Add into that
   layer, but only if the *other* input is quantized. That input gets an activation Q/DQ; the fused
   branch gets none (no Q/DQ on the outputs of weighted layers, none between Conv and BN or BN and
   the activation). When both inputs qualify, the deeper branch (longest path from the graph inputs,
   computed last) is the fused one, as TensorRT does, and the shallow one (a downsampling shortcut)
   is quantized. ``service/onnx_graph/fusions.py`` applies the same chain rules to check the result.
4. Nothing else is quantized: no Q/DQ after weighted layers, never on a graph output. Q/DQ is inserted
   on the consuming edge, so a graph output that also feeds an INT8 layer is still returned in float.

A tensor read by several quantized consumers has one activation amax and one QuantizeLinear; each
consuming node gets its own DequantizeLinear (``ActivationSite.edges``), see ``qdq.py`` for why.
Only the top-level graph is quantized; subgraph bodies (If/Loop) run in float.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import onnx

from service.onnx_graph.graph import GraphIndex
from service.quantize._units import (
    QDQ_MIN_OPSET,
    Edge,
    KeptLayer,
    join_inputs,
    mixed_join_reason,
    mixed_range_joins,
    reject_explicit_qdq,
    sigmoid_softmax_heads,
)
from service.quantize.canonical import canonical_model
from service.quantize.rewrite import DEFAULT_DOMAINS, WeightedLayer, weighted_layers
from service.quantize.skip import SkipSpec

PlacementTarget = Literal["tensorrt", "onnxruntime"]
_RESIDUAL_OPS = frozenset({"Add", "Sum"})
_RESIDUAL_ANCHOR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_SCALE_OPS = frozenset({"Add", "Mul", "Sub", "Div"})


@dataclass(frozen=True)
class ActivationSite:
    """An activation tensor to quantize per tensor, and the input slots that read it through Q/DQ."""

    tensor: str
    edges: tuple[Edge, ...]
    residual: bool  # True when at least one edge is the residual input of an Add/Sum


@dataclass(frozen=True)
class QdqPlan:
    """Where Q/DQ goes in one canonical model."""

    activations: tuple[ActivationSite, ...]
    weights: tuple[WeightedLayer, ...]  # the quantized layers, topological order
    kept: tuple[KeptLayer, ...]
    residual_adds: tuple[str, ...]

    @property
    def tensors(self) -> tuple[str, ...]:
        return tuple(site.tensor for site in self.activations)

    @property
    def quantized_nodes(self) -> tuple[str, ...]:
        return tuple(layer.node for layer in self.weights)

    @property
    def kept_nodes(self) -> tuple[str, ...]:
        return tuple(layer.node for layer in self.kept)


@dataclass(frozen=True)
class PlacementSummary:
    """What one target's placement does with one model, known before any calibration."""

    target: PlacementTarget
    tensors_to_calibrate: tuple[str, ...]
    quantized: tuple[WeightedLayer, ...]  # topological order
    kept: tuple[KeptLayer, ...]

    def unquantizable_reason(self) -> str | None:
        """Why no layer would run in INT8; None when some would.

        A model with nothing to quantize would come out as an "INT8" model without any INT8 in it, so
        callers turn this reason into a BadInput instead.
        """
        if self.quantized:
            return None
        if not self.kept:
            return (
                "the model has no Conv, ConvTranspose, Gemm or MatMul with a constant float32 weight, the "
                "only layers INT8 speeds up (weights computed from graph inputs or stored in another type "
                "do not count)"
            )
        shown = "; ".join(f"{layer.node} ({layer.reason})" for layer in self.kept[:8])
        more = f"; and {len(self.kept) - 8} more" if len(self.kept) > 8 else ""
        return f"every weighted layer stays in float for the {self.target} placement: {shown}{more}"


def tensorrt_summary(
    model: onnx.ModelProto, skip: SkipSpec | None = None, *, quantize_heads: bool = False
) -> PlacementSummary:
    """The TensorRT placement of ``model`` (any FP32 model; it is canonicalized here).

    Its tensors to calibrate are the inputs of the quantized layers plus the inputs of any Concat such
    an input comes from: a layer reading a join of far-apart ranges then stays float.
    """
    work = canonical_model(model, min_opset=QDQ_MIN_OPSET)
    plan = plan_qdq(work, skip, quantize_heads=quantize_heads)
    # A layer reading a Concat is judged by the ranges of the Concat's inputs, so those are collected too.
    index = GraphIndex(work.graph)
    joined = [name for tensor in plan.tensors for name in join_inputs(index, tensor)]
    return PlacementSummary(
        target="tensorrt",
        tensors_to_calibrate=tuple(dict.fromkeys([*plan.tensors, *joined])),
        quantized=plan.weights,
        kept=plan.kept,
    )


def plan_qdq(
    model: onnx.ModelProto,
    skip: SkipSpec | None = None,
    *,
    quantize_heads: bool = False,
    ranges: Mapping[str, float] | None = None,
) -> QdqPlan:
    """The placement of Q/DQ in a canonical model at opset >= 13 (see the module docstring).

    ``ranges`` (calibrated amax per tensor), when known, keep in float a weighted layer whose input
    is a Concat of ranges far apart (``_units.mixed_range_joins``: box coordinates in pixels joined
    with scores in [0, 1]), since its input Q/DQ would force one scale onto both. Without ranges the
    plan is the widest one.
    """
    graph = model.graph
    reject_explicit_qdq(graph)
    index = GraphIndex(graph)
    layers = weighted_layers(index)
    skipped = skip.resolve_canonical(model) if skip is not None else frozenset()
    heads = frozenset() if quantize_heads else sigmoid_softmax_heads(layers, index)
    mixed = mixed_range_joins(index, ranges) if ranges is not None else {}

    quantized: list[WeightedLayer] = []
    kept: list[KeptLayer] = []
    for layer in layers:
        join = mixed.get(index.node(layer.node).input[0])
        if layer.node in skipped:
            kept.append(KeptLayer(layer.node, layer.op_type, "skip"))
        elif layer.node in heads:
            kept.append(KeptLayer(layer.node, layer.op_type, "sigmoid/softmax head"))
        elif join is not None:
            kept.append(KeptLayer(layer.node, layer.op_type, mixed_join_reason(join)))
        else:
            quantized.append(layer)

    edges: dict[str, list[Edge]] = {}
    residual_tensors: set[str] = set()
    for layer in quantized:
        node = index.node(layer.node)
        edges.setdefault(node.input[0], []).append(Edge(layer.node, 0))

    anchors = {layer.node for layer in quantized if layer.op_type in _RESIDUAL_ANCHOR_OPS}
    depth = index.depths  # by label, which is the name on a canonical graph
    residual_adds: list[str] = []
    for node in graph.node:
        if node.op_type not in _RESIDUAL_OPS or node.domain not in DEFAULT_DOMAINS or len(node.input) != 2:
            continue
        if node.input[0] == node.input[1] or not all(
            name and not index.is_weight(name) for name in node.input
        ):
            continue
        branches = [
            (slot, end)
            for slot, name in enumerate(node.input)
            if (end := _fusable_branch_end(name, index, anchors)) is not None
        ]
        if not branches:
            continue
        # Of two fusable branches TensorRT fuses the Add into the one computed last: the deeper one.
        fused = min(branches, key=lambda branch: (-depth[branch[1]], branch[0]))[0]
        residual = 1 - fused
        residual_adds.append(node.name)
        edges.setdefault(node.input[residual], []).append(Edge(node.name, residual))
        residual_tensors.add(node.input[residual])

    order = {node.name: position for position, node in enumerate(graph.node)}
    sites = [
        ActivationSite(
            tensor=tensor,
            edges=tuple(sorted(slot_list, key=lambda e: (order[e.node], e.input_index))),
            residual=tensor in residual_tensors,
        )
        for tensor, slot_list in edges.items()
    ]
    sites.sort(key=lambda site: (order[site.edges[0].node], site.edges[0].input_index))
    return QdqPlan(
        activations=tuple(sites),
        weights=tuple(quantized),
        kept=tuple(kept),
        residual_adds=tuple(residual_adds),
    )


def _fusable_branch_end(tensor: str, index: GraphIndex, anchors: set[str]) -> str | None:
    """The last node of a weighted-layer chain producing ``tensor``, if TensorRT could fuse an Add onto it.

    The chain is the anchor (an INT8 weighted layer) followed by constant scale/bias ops and at most one
    BatchNormalization, looking through Identity and inference Dropout, every intermediate tensor read
    once; ``service/onnx_graph/fusions.py`` matches the same chains in the Q/DQ output.
    """
    current, end, seen_bn = tensor, None, False
    while True:
        if index.sole_reader(current) is None:
            return None  # another reader needs the intermediate value: no fusion
        producer = index.producer(current)
        if producer is None or producer.domain not in DEFAULT_DOMAINS:
            return None
        passes_through = producer.op_type == "Identity" or (
            producer.op_type == "Dropout" and not any(index.consumers(o) for o in producer.output[1:] if o)
        )
        if end is None and not passes_through:
            end = producer.name
        if producer.name in anchors:
            return end
        if passes_through:
            current = producer.input[0]
        elif producer.op_type == "BatchNormalization" and not seen_bn:
            current, seen_bn = producer.input[0], True
        elif (variable := _scale_op_input(producer, index)) is not None:
            current = variable
        else:
            return None


def _scale_op_input(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """The activation input of a constant elementwise affine step (x+c, x*c, c+x, c*x, x-c, x/c)."""
    if node.op_type not in _SCALE_OPS or len(node.input) != 2:
        return None
    first, second = node.input
    if index.is_weight(second) and not index.is_weight(first):
        return first
    if node.op_type in ("Add", "Mul") and index.is_weight(first) and not index.is_weight(second):
        return second
    return None
