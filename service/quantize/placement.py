"""Where Q/DQ goes: TensorRT's placement rules applied to one FP32 graph.

Contract: :func:`plan_qdq` reads a canonical model (``_graph.canonical_model`` at opset >= 13) and
returns a :class:`QdqPlan`; nothing is inserted here (that is ``qdq.py``), so the same plan answers
:func:`tensors_to_calibrate` before calibration and drives the insertion after it.

The rules, from TensorRT's explicit-quantization guide and the measured facts in the design:

1. Every *weighted layer* (Conv, ConvTranspose, Gemm, MatMul with a float32 constant weight, see
   ``_graph.WeightedLayer``) runs in INT8 unless kept: its data input gets a per-tensor activation
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

from collections import deque
from dataclasses import dataclass

import onnx

from service.errors import BadInput
from service.quantize._graph import (
    DEFAULT_DOMAINS,
    GraphIndex,
    WeightedLayer,
    canonical_model,
    weighted_layers,
)
from service.quantize.skip import SkipSpec

QDQ_MIN_OPSET = 13  # DequantizeLinear's axis attribute (per-channel weights) arrived in opset 13
_HEAD_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax"})
_RESIDUAL_OPS = frozenset({"Add", "Sum"})
_RESIDUAL_ANCHOR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_SCALE_OPS = frozenset({"Add", "Mul", "Sub", "Div"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass(frozen=True)
class Edge:
    """One input slot of one node."""

    node: str
    input_index: int


@dataclass(frozen=True)
class ActivationSite:
    """An activation tensor to quantize per tensor, and the input slots that read it through Q/DQ."""

    tensor: str
    edges: tuple[Edge, ...]
    residual: bool  # True when at least one edge is the residual input of an Add/Sum


@dataclass(frozen=True)
class KeptLayer:
    """A weighted layer left in float, and why."""

    node: str
    op_type: str
    reason: str  # "skip" or "sigmoid/softmax head"


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


def tensors_to_calibrate(
    model: onnx.ModelProto, skip: SkipSpec | None = None, *, quantize_heads: bool = False
) -> list[str]:
    """Exactly the activation tensors whose amax :func:`~service.quantize.qdq.qdq_model_from_scales` needs.

    Names refer to tensors of ``model`` itself (canonicalization and the opset upgrade keep tensor
    names), so they can be collected on the FP32 model as uploaded or after BN folding: folding keeps
    every name listed here. Order: topological, by first reader.
    """
    prepared = canonical_model(model, min_opset=QDQ_MIN_OPSET)
    return list(plan_qdq(prepared, skip, quantize_heads=quantize_heads).tensors)


def plan_qdq(
    model: onnx.ModelProto, skip: SkipSpec | None = None, *, quantize_heads: bool = False
) -> QdqPlan:
    """The placement of Q/DQ in a canonical model at opset >= 13 (see the module docstring)."""
    graph = model.graph
    present = sorted({n.op_type for n in graph.node if n.op_type in _QDQ_OPS and n.domain in DEFAULT_DOMAINS})
    if present:
        raise BadInput(
            f"the model already contains {', '.join(present)} nodes: it is explicitly quantized. "
            "Build it as given (its scales are used) or upload the FP32 model to calibrate it here."
        )
    index = GraphIndex(graph)
    layers = weighted_layers(index)
    skipped = skip.resolve_canonical(model) if skip is not None else frozenset()
    heads = frozenset() if quantize_heads else _sigmoid_softmax_heads(layers, index)

    quantized: list[WeightedLayer] = []
    kept: list[KeptLayer] = []
    for layer in layers:
        if layer.node in skipped:
            kept.append(KeptLayer(layer.node, layer.op_type, "skip"))
        elif layer.node in heads:
            kept.append(KeptLayer(layer.node, layer.op_type, "sigmoid/softmax head"))
        else:
            quantized.append(layer)

    edges: dict[str, list[Edge]] = {}
    residual_tensors: set[str] = set()
    for layer in quantized:
        node = index.nodes_by_name[layer.node]
        edges.setdefault(node.input[0], []).append(Edge(layer.node, 0))

    anchors = {layer.node for layer in quantized if layer.op_type in _RESIDUAL_ANCHOR_OPS}
    depth = _depths(index)
    residual_adds: list[str] = []
    for node in graph.node:
        if node.op_type not in _RESIDUAL_OPS or node.domain not in DEFAULT_DOMAINS or len(node.input) != 2:
            continue
        if node.input[0] == node.input[1] or not all(
            name and not index.is_constant(name) for name in node.input
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
        if current in index.graph_outputs or len(index.consumers_of(current)) != 1:
            return None  # another reader needs the intermediate value: no fusion
        producer = index.producer_of(current)
        if producer is None or producer.domain not in DEFAULT_DOMAINS:
            return None
        passes_through = producer.op_type == "Identity" or (
            producer.op_type == "Dropout" and not any(index.consumers_of(o) for o in producer.output[1:] if o)
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
    if index.is_constant(second) and not index.is_constant(first):
        return first
    if node.op_type in ("Add", "Mul") and index.is_constant(first) and not index.is_constant(second):
        return second
    return None


def _depths(index: GraphIndex) -> dict[str, int]:
    """Longest path, in nodes, from the graph inputs to each node; constants add nothing."""
    depth: dict[str, int] = {}
    for node in index.graph.node:
        longest = 0
        for name in node.input:
            producer = index.producer_of(name) if name and not index.is_constant(name) else None
            if producer is not None:
                longest = max(longest, depth.get(producer.name, 0))
        depth[node.name] = longest + 1
    return depth


def _sigmoid_softmax_heads(layers: tuple[WeightedLayer, ...], index: GraphIndex) -> frozenset[str]:
    """Weighted layers whose output reaches a sigmoid/softmax graph output through unweighted ops."""
    weighted = {layer.node for layer in layers}
    reaches_output: dict[str, bool] = {}
    heads = set()
    for layer in layers:
        start = index.nodes_by_name[layer.node]
        for node in _unweighted_descendants(start, index, weighted):
            if node.op_type not in _HEAD_OPS or node.domain not in DEFAULT_DOMAINS:
                continue
            if node.name not in reaches_output:
                reaches_output[node.name] = any(
                    out in index.graph_outputs
                    for n in [node, *_unweighted_descendants(node, index, weighted)]
                    for out in n.output
                )
            if reaches_output[node.name]:
                heads.add(layer.node)
                break
    return frozenset(heads)


def _unweighted_descendants(
    start: onnx.NodeProto, index: GraphIndex, weighted: set[str]
) -> list[onnx.NodeProto]:
    """Nodes reachable from ``start``'s outputs without entering a weighted layer (BFS order)."""
    seen: set[str] = set()
    found: list[onnx.NodeProto] = []
    queue = deque(out for out in start.output if out)
    while queue:
        tensor = queue.popleft()
        for consumer in index.consumers_of(tensor):
            if consumer.name in seen or consumer.name in weighted:
                continue
            seen.add(consumer.name)
            found.append(consumer)
            queue.extend(out for out in consumer.output if out)
    return found
