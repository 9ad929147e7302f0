"""What an uploaded model's graph may cost to analyse, checked on the wire before it is parsed.

Parsing, checking and summarising an ONNX graph costs memory per node (a graph of 1M tiny nodes in
a 29.8 MB file needed 1.27 GB, about 40 times its size), while initializer bytes stay raw and
cheap. So the main graph's node count and its size without initializers are read straight from the
protobuf wire format, walking only the top-level fields of ModelProto and GraphProto (no message is
built), and a model past either limit is refused before anything expensive runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from service.errors import TooLarge

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_NODE = 1  # GraphProto.node
_GRAPH_INITIALIZERS = (5, 15)  # GraphProto.initializer, GraphProto.sparse_initializer
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class GraphSize:
    """The main graph's node count and its serialized bytes less its initializers."""

    nodes: int
    graph_bytes: int


@dataclass(frozen=True)
class GraphLimits:
    max_nodes: int
    max_graph_bytes: int


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message (the real parser will say so)."""


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, payload start, payload end) of the length-delimited fields in data[start:end].

    A generator, so a graph of a million nodes is walked without a million tuples held at once.
    """
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(data, pos)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            yield number, pos, pos + length
            pos += length
        else:  # groups (3, 4) and invalid wire types do not occur in ONNX
            raise _Malformed
        if pos > end:
            raise _Malformed


def graph_size_from_bytes(data: bytes | memoryview) -> GraphSize | None:
    """The main graph's size as serialized, or None when ``data`` is not a well-formed message."""
    view = memoryview(data)
    try:
        nodes = graph_bytes = 0
        for number, start, end in _fields(view, 0, len(view)):
            if number != _MODEL_GRAPH:
                continue
            graph_bytes += end - start
            for field, field_start, field_end in _fields(view, start, end):
                if field == _GRAPH_NODE:
                    nodes += 1
                elif field in _GRAPH_INITIALIZERS:
                    graph_bytes -= field_end - field_start
        return GraphSize(nodes=nodes, graph_bytes=graph_bytes)
    except _Malformed:
        return None


def check_graph_size(data: bytes | memoryview, limits: GraphLimits) -> None:
    """Raise TooLarge naming the limit and its setting when the graph is past ``limits``.

    Malformed bytes pass: the parser that runs next refuses them with its own message.
    """
    size = graph_size_from_bytes(data)
    if size is None:
        return
    if size.nodes > limits.max_nodes:
        raise TooLarge(
            f"The model's graph has {size.nodes} nodes; this server analyses at most {limits.max_nodes} "
            "(ENGINE_SERVICE_MAX_MODEL_NODES). Simplify the graph (e.g. onnxsim) or ask the operator to "
            "raise the limit.",
            details={"limit": "max_model_nodes", "value": size.nodes, "max": limits.max_nodes},
        )
    if size.graph_bytes > limits.max_graph_bytes:
        raise TooLarge(
            f"The model's graph is {size.graph_bytes} bytes without its initializers; this server "
            f"analyses at most {limits.max_graph_bytes} (ENGINE_SERVICE_MAX_MODEL_GRAPH_BYTES). Move "
            "constant tensors from Constant nodes into initializers, or ask the operator to raise the limit.",
            details={
                "limit": "max_model_graph_bytes",
                "value": size.graph_bytes,
                "max": limits.max_graph_bytes,
            },
        )
