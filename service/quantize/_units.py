"""Values and graph questions shared by the two Q/DQ placements (private).

``placement.py`` (TensorRT) and ``ort_placement.py`` (ONNX Runtime's CPU provider) place Q/DQ by
different rules but describe the result with the same small values and keep the same heads in float.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import onnx

from service.errors import BadInput
from service.onnx_graph.graph import GraphIndex
from service.quantize._ranges import VALUE_MOVING_OPS
from service.quantize.rewrite import DEFAULT_DOMAINS, WeightedLayer

QDQ_MIN_OPSET = 13  # DequantizeLinear's axis attribute (per-channel weights) arrived in opset 13
HEAD_OPS = frozenset({"Sigmoid", "Softmax", "LogSoftmax"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass(frozen=True)
class Edge:
    """One input slot of one node."""

    node: str
    input_index: int


@dataclass(frozen=True)
class KeptLayer:
    """A weighted layer left in float, and why."""

    node: str
    op_type: str
    reason: str  # "skip", "sigmoid/softmax head", or why the target has no integer form for it


def reject_explicit_qdq(graph: onnx.GraphProto) -> None:
    """BadInput when the graph already holds Q/DQ: its scales come from training, not from here."""
    present = sorted({n.op_type for n in graph.node if n.op_type in _QDQ_OPS and n.domain in DEFAULT_DOMAINS})
    if present:
        raise BadInput(
            f"the model already contains {', '.join(present)} nodes: it is explicitly quantized. "
            "Build it as given (its scales are used) or upload the FP32 model to calibrate it here."
        )


def sigmoid_softmax_heads(layers: tuple[WeightedLayer, ...], index: GraphIndex) -> frozenset[str]:
    """Weighted layers whose output reaches a sigmoid/softmax graph output through unweighted ops."""
    weighted = {layer.node for layer in layers}
    reaches_output: dict[str, bool] = {}
    heads = set()
    for layer in layers:
        start = index.node(layer.node)
        for node in _unweighted_descendants(start, index, weighted):
            if node.op_type not in HEAD_OPS or node.domain not in DEFAULT_DOMAINS:
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
        for consumer in index.consumers(tensor):
            if consumer.name in seen or consumer.name in weighted:
                continue
            seen.add(consumer.name)
            found.append(consumer)
            queue.extend(out for out in consumer.output if out)
    return found


# A joined tensor's 255 levels over the largest input's range leave an input 8 times smaller 32 levels.
MAX_JOIN_RANGE_RATIO = 8.0


def mixed_range_joins(index: GraphIndex, ranges: Mapping[str, float]) -> dict[str, float]:
    """Tensors carrying a Concat of inputs whose ranges differ more than MAX_JOIN_RANGE_RATIO times
    (the Concat's output and what data-movement ops make of it), with that ratio. A Concat with an
    input of unknown range is not judged."""
    found: dict[str, float] = {}
    for node in index.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            continue
        if node.op_type == "Concat":
            values = [max(float(ranges[name]), 1e-12) for name in node.input if name in ranges]
            if len(values) == len(node.input) and max(values) > MAX_JOIN_RANGE_RATIO * min(values):
                found[node.output[0]] = max(values) / min(values)
        elif node.op_type in VALUE_MOVING_OPS and node.input and node.input[0] in found:
            found[node.output[0]] = found[node.input[0]]
    return found


def join_inputs(index: GraphIndex, tensor: str) -> tuple[str, ...]:
    """The non-constant inputs of the Concat that ``tensor`` comes from through data-movement ops
    (empty when it comes from none): whose ranges :func:`mixed_range_joins` needs."""
    seen: set[str] = set()
    while tensor not in seen:
        seen.add(tensor)
        node = index.producer(tensor)
        if node is None or node.domain not in DEFAULT_DOMAINS:
            return ()
        if node.op_type == "Concat":
            return tuple(name for name in node.input if name and not index.is_weight(name))
        if node.op_type not in VALUE_MOVING_OPS or not node.input:
            return ()
        tensor = node.input[0]
    return ()


def mixed_join_reason(ratio: float) -> str:
    return (
        f"its input joins tensors whose ranges differ {ratio:.0f}-fold "
        "(one INT8 scale would erase the smaller)"
    )
