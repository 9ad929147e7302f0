"""Graph rewrite helpers shared by the quantize modules: names, splicing, bypassing, weighted layers.

Every helper here mutates a graph or reads one through a :class:`~service.onnx_graph.graph.GraphIndex`
built by the caller. A rewrite invalidates any index of the graph it changes; callers build a new one
before asking again (see the conventions in ``service/onnx_graph/graph.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from service.onnx_graph.graph import GraphIndex
from service.onnx_graph.subgraphs import names_read, subgraph_reads

DEFAULT_DOMAINS = ("", "ai.onnx")
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


class NameAllocator:
    """Hands out tensor and node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        used: set[str] = {n.name for n in graph.node}
        used.update(t.name for t in graph.initializer)
        used.update(v.name for v in graph.input)
        used.update(v.name for v in graph.output)
        used.update(v.name for v in graph.value_info)
        for node in graph.node:
            used.update(node.input)
            used.update(node.output)
        self._used = used

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self._used:
            k += 1
            name = f"{base}__{k}"
        self._used.add(name)
        return name


@dataclass(frozen=True)
class WeightedLayer:
    """A Conv/ConvTranspose/Gemm/MatMul node whose weight is a float32 constant.

    ``axis`` is the weight axis that indexes output channels (the per-channel quantization axis), or
    None for a 1-D MatMul weight, which gets one per-tensor scale.
    """

    node: str
    op_type: str
    weight: str
    axis: int | None


def weighted_layers(index: GraphIndex) -> tuple[WeightedLayer, ...]:
    """The weighted layers of an indexed canonical graph, in topological order."""
    layers = []
    for node in index.nodes:
        layer = _weighted_layer(node, index)
        if layer is not None:
            layers.append(layer)
    return tuple(layers)


def _weighted_layer(node: onnx.NodeProto, index: GraphIndex) -> WeightedLayer | None:
    if node.domain not in DEFAULT_DOMAINS or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None
    weight = index.weight(node.input[1]) if len(node.input) >= 2 and node.input[0] else None
    if weight is None or weight.data_type != TensorProto.FLOAT or index.is_weight(node.input[0]):
        return None
    rank = len(weight.dims)
    axis: int | None
    if node.op_type == "Conv":
        axis = 0  # [C_out, C_in / group, k...]
    elif node.op_type == "ConvTranspose":
        # [C_in, C_out / group, k...]: axis 1 indexes output channels within a group; with group > 1
        # each scale is shared by the same channel of every group, which stays exact, just coarser.
        axis = 1
    elif node.op_type == "Gemm":
        if rank != 2:
            return None
        axis = 0 if int_attr(node, "transB", 0) else 1  # B is [N, K] when transposed, else [K, N]
    else:
        axis = rank - 1 if rank >= 2 else None  # MatMul B is [..., K, N]: N indexes output columns
    return WeightedLayer(node=node.name, op_type=node.op_type, weight=node.input[1], axis=axis)


def remove_unused_initializers(graph: onnx.GraphProto, candidates: Iterable[str]) -> None:
    """Drop the named initializers no node or subgraph body reads any more and that are no graph outputs."""
    still_read = names_read(graph)
    doomed = set(candidates) - still_read
    if not doomed:
        return
    kept = [t for t in graph.initializer if t.name not in doomed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_info = [v for v in graph.value_info if v.name not in doomed]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


def int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attr in node.attribute:
        if attr.name == name:
            return float(attr.f)
    return default


def bypass_identities(graph: onnx.GraphProto, accept: Callable[[onnx.NodeProto], bool]) -> None:
    """Remove the default-domain Identity nodes ``accept`` picks, wiring their readers to the source.

    Identities whose output is a graph output or read by a subgraph body (If/Loop/Scan from the
    outer scope) stay: those names must keep existing.
    """
    pinned = {o.name for o in graph.output} | subgraph_reads(graph)
    alias: dict[str, str] = {}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in alias:
                node.input[position] = alias[name]
        if (
            node.op_type == "Identity"
            and node.domain in DEFAULT_DOMAINS
            and node.output[0] not in pinned
            and accept(node)
        ):
            alias[node.output[0]] = node.input[0]
            continue
        kept.append(node)
    if not alias:
        return
    del graph.node[:]
    graph.node.extend(kept)
    info = [v for v in graph.value_info if v.name not in alias]
    del graph.value_info[:]
    graph.value_info.extend(info)


def splice_nodes(
    graph: onnx.GraphProto,
    before: Mapping[str, list[onnx.NodeProto]],
    after: Mapping[str, list[onnx.NodeProto]],
) -> None:
    """Insert new nodes in topological order: ``before[node name]`` right before that node,
    ``after[tensor]`` right after the node producing that tensor (``after[""]``: at the start)."""
    ordered: list[onnx.NodeProto] = list(after.get("", []))
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        ordered.append(node)
        for out in node.output:
            ordered.extend(after.get(out, []))
    del graph.node[:]
    graph.node.extend(ordered)
