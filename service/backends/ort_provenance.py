"""Where each node of an ONNX Runtime optimized graph came from, and its tensor types.

ONNX Runtime does not record which original nodes a fused node replaced, so the origin is derived
from names, in three steps (``origins(optimized, original)``):

1. **Claims by node name.** Fusions keep the root node's name (``FusedConv`` "conv1"), sometimes
   decorated by ORT's name generator: a ``"fused "`` or ``"InsertedPrecisionFreeCast_"`` prefix, a
   ``"/duplicated"``, ``"_nchwc"`` or ``"_token_<n>"`` suffix. The undecorated name is matched against
   the original node names and then against original tensor names (NCHWc nodes are named after the
   tensor they produce, e.g. ``"relu1_out_nchwc"``), whose producer is claimed.
2. **Claims by output tensor.** Fused nodes write the *last* absorbed node's output under its original
   name (FusedConv writes the Relu's output). An output that only reaches an original tensor through
   ORT's own layout nodes (ReorderOutput, Transpose) is followed through them; the layout nodes
   themselves claim nothing.
3. **Absorption.** Original nodes claimed by no optimized node are attached to the claimed nodes they
   connect to through tensors that no longer exist in the optimized graph: the BatchNormalization
   between a Conv and its Relu, the DequantizeLinear nodes a QLinearConv swallowed, a shape subgraph
   constant-folded into its Reshape. Removed no-ops (Identity, Dropout) are attributed to the node
   that took over their tensors.

What cannot be derived: an original node whose tensors all vanished and which touches no claimed node
(e.g. a whole branch constant-folded into an initializer that a fused node consumes) ends up in
``LayerReport.unmapped_nodes``; and when ORT renames both a node and its outputs, its claim is lost
and it can only be reached by absorption. Only the top-level graph is mapped (subgraphs of If/Loop are
not). The tensor types (``tensor_types``) are propagated through the graph because a saved optimized
model usually carries no ``value_info``.
"""

from __future__ import annotations

import re

import onnx
from onnx import TensorProto

from service.onnx_graph.graph import GraphIndex

LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput", "Transpose"})
INTEGER_OPS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool",
        "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax",
        "QLinearReduceMean", "QLinearWhere", "QLinearConvTranspose", "QGemm", "ConvInteger", "MatMulInteger",
        "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QEmbedLayerNormalization",
    }
)  # fmt: skip
_TO_FLOAT_OPS = frozenset({"MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
_INT32_OPS = frozenset({"ConvInteger", "MatMulInteger"})
_INT64_OPS = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})

# An activation ends an ORT fusion group: what reads it belongs to the next layer (or is a removed no-op).
_GROUP_ENDS = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu"})
_NO_OPS = frozenset({"Identity", "Dropout"})
_WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
_INPUT_SIDE_FUSIONS = frozenset({"Pad", "DequantizeLinear", "QuantizeLinear", "Identity", "Cast", "Dropout"})
_PREFIXES = ("fused ", "InsertedPrecisionFreeCast_")
_SUFFIX = re.compile(r"(/duplicated|_nchwc|_token_\d+)$")


def undecorated(name: str) -> str:
    """A node name without the prefixes and suffixes ORT's name generator adds."""
    previous = None
    while previous != name:
        previous = name
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        name = _SUFFIX.sub("", name)
    return name


def origins(optimized: onnx.GraphProto, original: onnx.GraphProto) -> list[tuple[str, ...]]:
    """For each node of ``optimized`` (in order), the names of the original nodes it stands for."""
    index = _OriginalIndex(original)
    optimized_index = GraphIndex(optimized)
    claims = [_claims(node, index, optimized_index) for node in optimized.node]
    claimed = set().union(*claims) if claims else set()
    survivors = [_survivor(node, own, index) for node, own in zip(optimized.node, claims, strict=True)]
    present = _present_tensors(optimized, survivors)
    # Backward cones first: a fused node is named after (and writes) its *last* original node, so what
    # it absorbed lies upstream of its claim. Only then may the rest reach forward (removed no-ops).
    # In that order a chain of fused nodes whose intermediate tensors ORT renamed (NCHWc convs on
    # AVX2, where no ReorderOutput separates them) is split at each claim instead of being swallowed
    # by the first node's forward reach.
    backward = [
        set() if survivor is not None else index.absorbed(own, present, claimed, forward=False)
        for own, survivor in zip(claims, survivors, strict=True)
    ]
    taken = claimed.union(*backward) if backward else claimed
    result: list[tuple[str, ...]] = []
    for own, survivor, upstream in zip(claims, survivors, backward, strict=True):
        # A node that is an original node kept as it was (at most rewired or renamed) absorbed nothing.
        absorbed = (
            set() if survivor is not None else upstream | index.absorbed(own | upstream, present, taken)
        )
        result.append(tuple(name for name in index.order if name in own or name in absorbed))
    return result


def _fusable_upstream(node: onnx.NodeProto, slot: int, producer: onnx.NodeProto) -> bool:
    """Whether ``producer`` can have been fused into ``node`` through input ``slot``.

    A weighted layer's data input comes from another layer: ORT fuses only a Pad or the Q/DQ around
    it into the layer itself, never the Relu or Add that computed it, even when ORT renamed the tensor
    between them (NCHWc chains); and no node absorbs an activation it reads, which ends another group.
    """
    if node.op_type in _WEIGHTED_OPS and slot == 0:
        return producer.op_type in _INPUT_SIDE_FUSIONS
    # An activation ends its own group: a residual Add reads the previous block's Relu, never fuses it.
    return producer.op_type not in _GROUP_ENDS or node.op_type in _NO_OPS


def _survivor(node: onnx.NodeProto, own: set[str], index: _OriginalIndex) -> onnx.NodeProto | None:
    """The original node ``node`` is, unchanged in kind, if it is one."""
    if len(own) != 1:
        return None
    original = index.by_name[next(iter(own))]
    same_kind = (original.domain or "ai.onnx", original.op_type) == (node.domain or "ai.onnx", node.op_type)
    return original if same_kind else None


def _present_tensors(optimized: onnx.GraphProto, survivors: list[onnx.NodeProto | None]) -> set[str]:
    """Original tensor names that still exist in the optimized graph, possibly under a new name."""
    present = _tensor_names(optimized)
    present |= {undecorated(name) for name in present}
    for survivor in survivors:
        if survivor is not None:  # ORT renames a kept node's outputs (qdq_s8_to_u8_quant...): same tensors
            present.update(name for name in survivor.output if name)
    return present


class _OriginalIndex:
    """The original graph's shared index, plus what name matching needs: named nodes, in graph order."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = GraphIndex(graph)
        self.by_name = {node.name: node for node in graph.node if node.name}
        self.order = [node.name for node in graph.node if node.name]
        self.sources = self.graph.graph_inputs | set(self.graph.initializers)

    def claim_for_name(self, name: str) -> str | None:
        for candidate in dict.fromkeys((name, undecorated(name))):
            if candidate in self.by_name:
                return candidate
            producer = self.graph.producer(candidate)
            if producer is not None and producer.name:
                return producer.name
        return None

    def absorbed(
        self, own: set[str], present: set[str], claimed: set[str], *, forward: bool = True
    ) -> set[str]:
        """Unclaimed original nodes joined to ``own`` through tensors that vanished (upstream only
        unless ``forward``)."""
        cone: set[str] = set()
        frontier = [name for name in own if name in self.by_name]
        while frontier:
            node = self.by_name[frontier.pop()]
            neighbours: list[onnx.NodeProto] = []
            for slot, tensor in enumerate(node.input):
                producer = self.graph.producer(tensor) if tensor else None
                if (
                    producer is not None
                    and tensor not in present
                    and tensor not in self.sources
                    and _fusable_upstream(node, slot, producer)
                ):
                    neighbours.append(producer)
            for tensor in node.output if forward else ():
                if tensor and tensor not in present:
                    neighbours.extend(
                        consumer
                        for consumer in self.graph.readers(tensor)
                        if node.op_type not in _GROUP_ENDS or consumer.op_type in _NO_OPS
                    )
            for neighbour in neighbours:
                name = neighbour.name
                if name and name not in claimed and name not in cone:
                    cone.add(name)
                    frontier.append(name)
        return cone


def _claims(node: onnx.NodeProto, index: _OriginalIndex, optimized: GraphIndex) -> set[str]:
    own: set[str] = set()
    by_name = index.claim_for_name(node.name) if node.name else None
    if by_name is not None:
        own.add(by_name)
    if node.op_type in LAYOUT_OPS and by_name is None:
        return own  # ORT's own layout conversions stand for no original node
    for tensor in _anchored_outputs(node, index, optimized, depth=0):
        producer = index.graph.producer(tensor)
        if producer is not None and producer.name:
            own.add(producer.name)
    return own


def _anchored_outputs(
    node: onnx.NodeProto, index: _OriginalIndex, optimized: GraphIndex, depth: int
) -> list[str]:
    found: list[str] = []
    for tensor in node.output:
        if not tensor:
            continue
        if index.graph.producer(tensor) is not None:
            found.append(tensor)
        elif depth < 4:  # layout chains are short; the bound keeps a pathological graph cheap
            for consumer in optimized.readers(tensor):
                if consumer.op_type in LAYOUT_OPS and index.claim_for_name(consumer.name) is None:
                    found.extend(_anchored_outputs(consumer, index, optimized, depth + 1))
    return found


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {value.name for value in (*graph.input, *graph.output)} | {
        init.name for init in graph.initializer
    }
    for node in graph.node:
        names.update(name for name in (*node.input, *node.output) if name)
    return names


def tensor_types(graph: onnx.GraphProto) -> dict[str, int]:
    """ONNX element type of every tensor whose type is declared or can be propagated."""
    types: dict[str, int] = {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        for position, output in enumerate(node.output):
            if output and output not in types:
                inferred = _output_type(node, position, types)
                if inferred:
                    types[output] = inferred
    return types


def _output_type(node: onnx.NodeProto, position: int, types: dict[str, int]) -> int:
    op = node.op_type
    inputs = list(node.input)

    def input_type(at: int) -> int:
        return types.get(inputs[at], 0) if at < len(inputs) and inputs[at] else 0

    if op == "Cast":
        return next((int(attr.i) for attr in node.attribute if attr.name == "to"), 0)
    if op == "QuantizeLinear":
        return input_type(2) or TensorProto.UINT8
    if op == "DequantizeLinear":
        return input_type(1) or TensorProto.FLOAT
    if op == "DynamicQuantizeLinear":
        return (
            TensorProto.UINT8
            if position == 0
            else (TensorProto.FLOAT if position == 1 else TensorProto.UINT8)
        )
    if op in _TO_FLOAT_OPS:
        return TensorProto.FLOAT
    if op in _INT32_OPS:
        return TensorProto.INT32
    if op in _INT64_OPS:
        return TensorProto.INT64
    if op == "QGemm":  # a y_zero_point input makes the output quantized, else it is float
        return input_type(8) or TensorProto.FLOAT
    return next((types[name] for name in inputs if name and name in types), 0)
