"""Small ONNX models generated for tests, each with its topology sketched.

Weights are seeded random numbers: good for structure, numerics and round trips, not for accuracy
claims (those use the trained PP-OCR models shipped by ``rapidocr``). Node names are stable so tests
can refer to them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 17


class _GraphBuilder:
    """Accumulates nodes and initializers with deterministic weights."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.2) -> str:
        data = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def const(self, name: str, data: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(data, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, stride: int = 1) -> str:
        w = self.weight(f"{name}.weight", (cout, cin, k, k), scale=(2.0 / (cin * k * k)) ** 0.5)
        b = self.weight(f"{name}.bias", (cout,), scale=0.05)
        return self.node(
            "Conv", [x, w, b], name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2
        )

    def bn(self, x: str, c: int, name: str) -> str:
        scale = self.const(f"{name}.scale", (1.0 + 0.1 * self.rng.standard_normal(c)).astype(np.float32))
        bias = self.const(f"{name}.bias", (0.1 * self.rng.standard_normal(c)).astype(np.float32))
        mean = self.const(f"{name}.mean", (0.1 * self.rng.standard_normal(c)).astype(np.float32))
        var = self.const(f"{name}.var", (0.5 + self.rng.random(c)).astype(np.float32))
        return self.node("BatchNormalization", [x, scale, bias, mean, var], name, epsilon=1e-5)

    def model(
        self,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        name: str,
        opset: int,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests"
        )
        # Parsers lag behind the newest IR; pin the IR version that introduced this opset's era.
        model.ir_version = 8 if opset <= 17 else 10
        onnx.checker.check_model(model)
        return model


def resnet_block_classifier(
    *,
    channels: int = 8,
    size: int = 16,
    classes: int = 10,
    batch: int | str = "N",
    opset: int = DEFAULT_OPSET,
    seed: int = 0,
    softmax: bool = False,
    spatial: tuple[int | str, int | str] | None = None,
) -> onnx.ModelProto:
    """A tiny ResNet-style classifier (``spatial`` overrides the input's H, W: names make them dynamic).

    input[N,3,H,W]
      -> stem: Conv -> BatchNormalization -> Relu                       (conv_bn_relu)
      -> block: Conv -> BN -> Relu -> Conv -> BN -> Add(stem) -> Relu   (conv_bn_relu, conv_bn_add)
      -> head: Conv -> Clip(0,6)                                        (conv_relu as ReLU6)
      -> GlobalAveragePool -> Flatten -> Gemm -> Relu -> Gemm           (gemm_relu)
      [-> Softmax]
      -> logits[N,classes]
    """
    g = _GraphBuilder(seed)
    c = channels
    x = g.bn(g.conv("input", 3, c, "stem_conv"), c, "stem_bn")
    stem = g.node("Relu", [x], "stem_relu")
    y = g.node("Relu", [g.bn(g.conv(stem, c, c, "block_conv1"), c, "block_bn1")], "block_relu1")
    y = g.bn(g.conv(y, c, c, "block_conv2"), c, "block_bn2")
    y = g.node("Relu", [g.node("Add", [y, stem], "block_add")], "block_relu2")
    head = g.conv(y, c, 2 * c, "head_conv", k=1)
    if opset >= 11:  # Clip takes its bounds as inputs from opset 11, as attributes before
        lo = g.const("clip_min", np.array(0.0, np.float32))
        hi = g.const("clip_max", np.array(6.0, np.float32))
        y = g.node("Clip", [head, lo, hi], "head_relu6")
    else:
        y = g.node("Clip", [head], "head_relu6", min=0.0, max=6.0)
    y = g.node("Flatten", [g.node("GlobalAveragePool", [y], "pool")], "flatten")
    fc1_w, fc1_b = g.weight("fc1.weight", (16, 2 * c), 0.3), g.weight("fc1.bias", (16,), 0.05)
    y = g.node("Relu", [g.node("Gemm", [y, fc1_w, fc1_b], "fc1", transB=1)], "fc1_relu")
    fc2_w, fc2_b = g.weight("fc2.weight", (classes, 16), 0.3), g.weight("fc2.bias", (classes,), 0.05)
    logits = g.node("Gemm", [y, fc2_w, fc2_b], "fc2", transB=1)
    if softmax:
        logits = g.node("Softmax", [logits], "softmax", axis=1)
    g.nodes[-1].output[0] = "logits"
    height, width = spatial or (size, size)
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, height, width])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    return g.model(inputs, outputs, "resnet_block_classifier", opset)


def two_input_adder(*, size: int = 8, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Two named inputs for multi-input calibration and inference tests.

    image[N,3,S,S] -> Conv -> Relu --+
                                     Add -> out[N,4,S,S]
    bias_map[N,4,S,S] ---------------+
    """
    g = _GraphBuilder(1)
    y = g.node("Relu", [g.conv("image", 3, 4, "conv")], "relu")
    g.node("Add", [y, "bias_map"], "add")
    g.nodes[-1].output[0] = "out"
    inputs = [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size]),
        helper.make_tensor_value_info("bias_map", TensorProto.FLOAT, ["N", 4, size, size]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, size, size])]
    return g.model(inputs, outputs, "two_input_adder", opset)


def shape_expander(*, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A model whose output size is set by an input's values: the request picks the allocation.

    shape (int64, [1]) --> Expand(one: float32 [1]) --> out (float32, [n])
    """
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [1])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n"])
    one = numpy_helper.from_array(np.ones(1, np.float32), "one")
    node = helper.make_node("Expand", ["one", "shape"], ["out"], name="expand")
    graph = helper.make_graph([node], "shape_expander", [shape], [out], initializer=[one])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def relu_of_shape(shape: list[int | str], *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """A one-node model whose only size is its input's: tiny on disk, as large as ``shape`` at run time.

    x (float32, shape) --> Relu --> y
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu_of_shape", [x], [y]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def model_bytes(model: onnx.ModelProto) -> bytes:
    """Serialized bytes of a model, as a client would upload them."""
    return bytes(model.SerializeToString())
