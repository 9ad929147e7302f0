"""Explicitly quantized test models, placed by hand (independently of service.quantize).

``hand_qdq_model(model)`` rewrites an FP32 model the way a QAT export looks to TensorRT::

    x -> QuantizeLinear -> DequantizeLinear --+
                                              Conv / Gemm -> ...
    int8 W -> DequantizeLinear (axis 0) ------+      (bias stays float)

    a -> Q -> DQ --+
                   Add                          (both inputs of every Add)
    b -> Q -> DQ --+

Activations: per-tensor symmetric scales (zero point 0) from the max |x| of each tensor on a seeded
batch run through ONNX Runtime; weights: per-output-channel INT8 initializers. ``int32_bias=True``
instead quantizes each Conv/Gemm bias to int32 behind a DequantizeLinear, as ONNX Runtime's own
quantizer does; TensorRT-RTX's parser rejects that form.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def activation_amax(
    model: onnx.ModelProto, tensors: list[str], feeds: dict[str, np.ndarray]
) -> dict[str, float]:
    """max |x| of each named tensor on ``feeds`` (graph inputs are read from the feeds)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_inputs = {value.name for value in probe.graph.input}
    for name in tensors:
        if name not in graph_inputs:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    values = dict(zip(names, session.run(names, feeds), strict=True)) | feeds
    return {name: float(np.abs(values[name]).max()) for name in tensors}


def hand_qdq_model(model: onnx.ModelProto, *, int32_bias: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` with Q/DQ as sketched in the module docstring."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    inits = {init.name: init for init in graph.initializer}
    quantized_inputs = _quantized_activation_inputs(graph)
    feeds = {
        value.name: np.random.default_rng(seed).standard_normal(_concrete(value)).astype(np.float32)
        for value in graph.input
        if value.name not in inits
    }
    amax = activation_amax(model, sorted({graph_input for _, _, graph_input in quantized_inputs}), feeds)

    nodes: list[onnx.NodeProto] = []
    dequantized: dict[str, str] = {}
    for node in graph.node:
        for position, tensor in enumerate(node.input):
            if (node.name, position, tensor) in quantized_inputs:
                if tensor not in dequantized:
                    dequantized[tensor] = _add_activation_qdq(nodes, graph, tensor, amax[tensor])
                node.input[position] = dequantized[tensor]
        if node.op_type in ("Conv", "Gemm"):
            node.input[1] = _add_weight_dq(nodes, graph, inits[node.input[1]])
            if int32_bias and len(node.input) > 2:
                node.input[2] = _add_int32_bias_dq(nodes, graph, inits, node, amax)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(work)
    return work


def _quantized_activation_inputs(graph: onnx.GraphProto) -> set[tuple[str, int, str]]:
    sites: set[tuple[str, int, str]] = set()
    for node in graph.node:
        if node.op_type in ("Conv", "Gemm"):
            sites.add((node.name, 0, node.input[0]))
        elif node.op_type == "Add":
            sites.update((node.name, position, tensor) for position, tensor in enumerate(node.input))
    return sites


def _concrete(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else 2 for d in value.type.tensor_type.shape.dim)


def _add_activation_qdq(nodes: list[onnx.NodeProto], graph: onnx.GraphProto, tensor: str, amax: float) -> str:
    scale, zero = f"{tensor}.qscale", f"{tensor}.qzero"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(max(amax, 1e-6) / 127.0, np.float32), scale),
            numpy_helper.from_array(np.array(0, np.int8), zero),
        ]
    )
    nodes.append(
        helper.make_node("QuantizeLinear", [tensor, scale, zero], [f"{tensor}.q"], name=f"{tensor}_Q")
    )
    nodes.append(
        helper.make_node(
            "DequantizeLinear", [f"{tensor}.q", scale, zero], [f"{tensor}.dq"], name=f"{tensor}_DQ"
        )
    )
    return f"{tensor}.dq"


def _add_weight_dq(nodes: list[onnx.NodeProto], graph: onnx.GraphProto, weight: onnx.TensorProto) -> str:
    values = numpy_helper.to_array(weight)
    scales = (np.abs(values).reshape(values.shape[0], -1).max(axis=1) / 127.0).astype(np.float32)
    scales[scales == 0] = 1.0
    shaped = scales.reshape((-1,) + (1,) * (values.ndim - 1))
    quantized = np.clip(np.round(values / shaped), -127, 127).astype(np.int8)
    name = weight.name
    graph.initializer.extend(
        [
            numpy_helper.from_array(quantized, f"{name}.int8"),
            numpy_helper.from_array(scales, f"{name}.wscale"),
            numpy_helper.from_array(np.zeros_like(scales, dtype=np.int8), f"{name}.wzero"),
        ]
    )
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{name}.int8", f"{name}.wscale", f"{name}.wzero"],
            [f"{name}.dq"],
            name=f"{name}_DQ",
            axis=0,
        )
    )
    return f"{name}.dq"


def _add_int32_bias_dq(
    nodes: list[onnx.NodeProto],
    graph: onnx.GraphProto,
    inits: dict[str, onnx.TensorProto],
    node: onnx.NodeProto,
    amax: dict[str, float],
) -> str:
    bias = inits[node.input[2]]
    weight_scales = numpy_helper.to_array(
        next(init for init in graph.initializer if init.name == f"{node.input[1].removesuffix('.dq')}.wscale")
    )
    activation = node.input[0].removesuffix(".dq")
    scale = (weight_scales * (max(amax[activation], 1e-6) / 127.0)).astype(np.float32)
    quantized = np.round(numpy_helper.to_array(bias) / scale).astype(np.int32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(quantized, f"{bias.name}.int32"),
            numpy_helper.from_array(scale, f"{bias.name}.bscale"),
        ]
    )
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [f"{bias.name}.int32", f"{bias.name}.bscale"],
            [f"{bias.name}.dq"],
            name=f"{bias.name}_DQ",
            axis=0,
        )
    )
    return f"{bias.name}.dq"
