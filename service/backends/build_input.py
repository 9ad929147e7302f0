"""What every backend needs to know about the model bytes before its builder sees them.

``build_input_from(model_bytes, spec)`` parses the bytes once (through the service's one ONNX door,
``model_from_bytes``: non-ONNX bytes are InvalidModel with an actionable message), reads the real
inputs and node names, checks the requested shape ranges against the graph and applies the documented
defaults (:mod:`service.backends.shapes`). The builders then get validated values, and the layer
reports get the node names they account for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx

from service.backends.base import BuildSpec, ShapeRange
from service.backends.shapes import shape_ranges_for
from service.onnx_graph.inspect import TensorSpec, model_inputs
from service.onnx_graph.loading import model_from_bytes

_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
PLACEHOLDER_DIM = "?"


@dataclass(frozen=True, eq=False)
class BuildInput:
    """A parsed model plus validated build facts."""

    model: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    node_names: tuple[str, ...]
    shape_ranges: Mapping[str, ShapeRange] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # defaults applied, said in the build log
    parser_bytes: bytes = b""  # the bytes to hand to an ONNX parser (see independent_placeholder_dims)

    @property
    def has_qdq(self) -> bool:
        """Whether the graph is explicitly quantized (has Q/DQ nodes at the top level)."""
        return any(node.op_type in _QDQ_OPS for node in self.model.graph.node)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)


def build_input_from(model_bytes: bytes, spec: BuildSpec, *, complete_shapes: bool = True) -> BuildInput:
    """Parse and check; raises InvalidModel for unusable bytes and BadInput for unusable shapes.

    ``complete_shapes``: every dynamic input needs a range (TensorRT profiles); False for runtimes
    that take any shape (see :func:`service.backends.shapes.shape_ranges_for`).
    """
    # The checker already ran at upload; running it again per build would only cost time.
    model = model_from_bytes(model_bytes, check=False)
    inputs = model_inputs(model)
    ranges, notes = shape_ranges_for(inputs, spec.shapes, complete=complete_shapes)
    renamed = independent_placeholder_dims(model)
    if renamed:
        notes = (
            *notes,
            f"dimensions named '{PLACEHOLDER_DIM}' made independent ({', '.join(renamed)}): TensorRT "
            "reads equal dimension names as equal sizes",
        )
    return BuildInput(
        model=model,
        inputs=inputs,
        node_names=tuple(node.name for node in model.graph.node if node.name),
        shape_ranges=ranges,
        notes=notes,
        parser_bytes=model.SerializeToString() if renamed else model_bytes,
    )


def independent_placeholder_dims(model: onnx.ModelProto) -> list[str]:
    """Give every graph I/O dimension named ``?`` its own name, in place; returns the new names.

    Some exporters (PaddlePaddle's, e.g. PP-OCR's classifier: ``[?, 3, ?, ?]``) write ``?`` for
    "unknown". ONNX Runtime treats those as independent, but TensorRT's parser treats dimensions
    sharing a name as one size, so a 48x192 profile would be rejected as inconsistent.
    """
    renamed: list[str] = []
    for value in (*model.graph.input, *model.graph.output):
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_param") and dim.dim_param == PLACEHOLDER_DIM:
                dim.dim_param = f"{value.name}_dim{axis}"
                renamed.append(dim.dim_param)
    return renamed
