"""What a model is: I/O specs, opset, op counts and its explicit quantization.

The summary is computed once at upload and stored with the model record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
from onnx import helper

from service.onnx_graph.graph import GraphIndex

QUANTIZE_OPS = frozenset({"QuantizeLinear"})
DEQUANTIZE_OPS = frozenset({"DequantizeLinear"})


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output. Dims are ints, or strings for symbolic/unknown dims ("?")."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class QuantizationInfo:
    """Explicit quantization found in the graph."""

    explicit: bool
    qdq_pairs: int
    per_channel_weights: int
    quantized_ops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """The stored summary of an uploaded model."""

    ir_version: int
    opset: int
    producer: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    op_counts: dict[str, int]
    quantization: QuantizationInfo

    def to_dict(self) -> dict[str, Any]:
        return {
            "ir_version": self.ir_version,
            "opset": self.opset,
            "producer": self.producer,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "op_counts": dict(self.op_counts),
            "quantization": asdict(self.quantization),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(
            ir_version=data["ir_version"],
            opset=data["opset"],
            producer=data["producer"],
            inputs=tuple(_spec_from_dict(s) for s in data["inputs"]),
            outputs=tuple(_spec_from_dict(s) for s in data["outputs"]),
            op_counts=dict(data["op_counts"]),
            quantization=QuantizationInfo(**data["quantization"]),
        )


def _spec_from_dict(data: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=data["name"], dtype=data["dtype"], shape=tuple(data["shape"]))


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ("" or "ai.onnx") operator set."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    return 0


def tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """A ValueInfoProto as a TensorSpec (non-tensor types get dtype "unknown")."""
    ttype = value.type.tensor_type
    try:
        dtype = str(helper.tensor_dtype_to_np_dtype(ttype.elem_type)) if ttype.elem_type else "unknown"
    except KeyError:
        dtype = "unknown"
    dims: list[int | str] = []
    for dim in ttype.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value >= 0:
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(dims))


def model_inputs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    """Real inputs: graph inputs that are not initializers (IR < 4 lists initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return tuple(tensor_spec(v) for v in model.graph.input if v.name not in initializers)


def model_outputs(model: onnx.ModelProto) -> tuple[TensorSpec, ...]:
    return tuple(tensor_spec(v) for v in model.graph.output)


def quantization_info(model: onnx.ModelProto) -> QuantizationInfo:
    """Count Q->DQ pairs, per-channel weight dequantizers and the ops DequantizeLinear feeds."""
    graph = model.graph
    index = GraphIndex(graph)
    initializers = index.initializers
    constants = {out for node in graph.node if node.op_type == "Constant" for out in node.output}

    qdq_pairs = 0
    per_channel = 0
    fed_ops: Counter[str] = Counter()
    for node in graph.node:
        # The checker does not verify ops of unregistered domains, so a Q/DQ node there may lack inputs.
        if node.op_type not in DEQUANTIZE_OPS or not node.input or not node.output:
            continue
        source = index.producer(node.input[0])
        quantized_source = source is not None and source.op_type in QUANTIZE_OPS and bool(source.input)
        if quantized_source:
            qdq_pairs += 1
        weight_like = (
            node.input[0] in initializers
            or node.input[0] in constants
            or (quantized_source and source is not None and source.input[0] in initializers)
        )
        if weight_like and _is_per_channel(node, initializers):
            per_channel += 1
        for reader in index.readers(node.output[0]):
            if reader.op_type not in QUANTIZE_OPS | DEQUANTIZE_OPS:  # one count per input slot it feeds
                fed_ops[reader.op_type] += sum(1 for name in reader.input if name == node.output[0])
    explicit = any(n.op_type in QUANTIZE_OPS | DEQUANTIZE_OPS for n in graph.node)
    return QuantizationInfo(
        explicit=explicit,
        qdq_pairs=qdq_pairs,
        per_channel_weights=per_channel,
        quantized_ops=dict(sorted(fed_ops.items())),
    )


def _is_per_channel(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    if len(node.input) < 2:
        return False
    scale = initializers.get(node.input[1])
    if scale is None:
        return False
    size = 1
    for dim in scale.dims:
        size *= dim
    return size > 1


def model_info(model: onnx.ModelProto) -> ModelInfo:
    """Summarize a validated model."""
    op_counts = Counter(node.op_type for node in model.graph.node)
    return ModelInfo(
        ir_version=int(model.ir_version),
        opset=default_opset(model),
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        inputs=model_inputs(model),
        outputs=model_outputs(model),
        op_counts=dict(sorted(op_counts.items())),
        quantization=quantization_info(model),
    )
