"""Small ONNX graphs for the quantize tests, each covering layouts the shared model factory does not.

Weights are seeded random numbers; node names are stable so tests can refer to them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def tensor(self, name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        self.inits.append(
            numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name)
        )
        return name

    def bn(self, x: str, c: int, name: str, out: str | None = None) -> str:
        params = [
            self.const(f"{name}.scale", (1 + 0.2 * self.rng.standard_normal(c)).astype(np.float32)),
            self.const(f"{name}.bias", (0.1 * self.rng.standard_normal(c)).astype(np.float32)),
            self.const(f"{name}.mean", (0.1 * self.rng.standard_normal(c)).astype(np.float32)),
            self.const(f"{name}.var", (0.5 + self.rng.random(c)).astype(np.float32)),
        ]
        return self.node("BatchNormalization", [x, *params], name, out=out, epsilon=1e-3)

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs: object) -> str:
        output = out or f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], opset: int
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test_graph", inputs, outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests"
        )
        model.ir_version = 8 if opset <= 17 else 10
        onnx.checker.check_model(model, full_check=True)
        return model


def _fv(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def two_conv_residual(*, opset: int = 17) -> onnx.ModelProto:
    """Both inputs of the residual Add come from convolutions.

    x[N,4,8,8] -> conv_a -> bn_a --+
                                   Add(res_add) -> Relu -> out
    x ---------> conv_b -----------+
    """
    b = _Builder(3)
    a = b.bn(
        b.node("Conv", ["x", b.tensor("wa", (4, 4, 3, 3)), b.tensor("ba", (4,))], "conv_a", pads=[1] * 4),
        4,
        "bn_a",
    )
    c = b.node("Conv", ["x", b.tensor("wb", (4, 4, 1, 1))], "conv_b")
    b.node("Relu", [b.node("Add", [a, c], "res_add")], "relu", out="out")
    return b.model([_fv("x", ["N", 4, 8, 8])], [_fv("out", ["N", 4, 8, 8])], opset)


def deconv_sigmoid_head(*, opset: int = 17) -> onnx.ModelProto:
    """A segmentation-style head with a grouped ConvTranspose and a sigmoid probability output.

    x[N,4,8,8] -> enc (Conv) -> Relu -> features (graph output, also read below)
      -> up (ConvTranspose group=2, stride 2) -> up_bn -> Relu
      -> head (Conv 1x1, 4->1) -> Add(bias) -> Sigmoid -> prob[N,1,16,16]
    """
    b = _Builder(4)
    enc = b.node("Conv", ["x", b.tensor("enc.w", (4, 4, 3, 3)), b.tensor("enc.b", (4,))], "enc", pads=[1] * 4)
    features = b.node("Relu", [enc], "enc_relu", out="features")
    up = b.node("ConvTranspose", [features, b.tensor("up.w", (4, 2, 2, 2))], "up", strides=[2, 2], group=2)
    up = b.node("Relu", [b.bn(up, 4, "up_bn")], "up_relu")
    head = b.node("Conv", [up, b.tensor("head.w", (1, 4, 1, 1))], "head")
    head = b.node(
        "Add", [head, b.const("head.b", np.array([0.1], np.float32).reshape(1, 1, 1, 1))], "head_bias"
    )
    b.node("Sigmoid", [head], "sigmoid", out="prob")
    return b.model(
        [_fv("x", ["N", 4, 8, 8])], [_fv("prob", ["N", 1, 16, 16]), _fv("features", ["N", 4, 8, 8])], opset
    )


def mlp_weight_layouts(*, opset: int = 17) -> onnx.ModelProto:
    """Every weight layout of the fully connected ops, with weights fed the ways exporters feed them.

    x[N,6] -> fc_a (Gemm transB=0, W[6,5] via Identity) -> Relu
           -> fc_b (MatMul, W[5,4] from a Constant node) -> Add(bias) -> Relu
           -> fc_c (Gemm transB=1, W[3,4]) -> out[N,3]
    x -> score (MatMul, 1-D W[6]) -> score[N]
    """
    b = _Builder(5)
    b.nodes.append(
        helper.make_node(
            "Identity", [b.tensor("fc_a.w_raw", (6, 5))], ["fc_a.w"], name="fc_a_weight_identity"
        )
    )
    y = b.node("Relu", [b.node("Gemm", ["x", "fc_a.w", b.tensor("fc_a.b", (5,))], "fc_a")], "relu_a")
    w_b = numpy_helper.from_array((b.rng.standard_normal((5, 4)) * 0.3).astype(np.float32), "fc_b.w_value")
    b.nodes.append(helper.make_node("Constant", [], ["fc_b.w"], name="fc_b_weight", value=w_b))
    y = b.node("Add", [b.node("MatMul", [y, "fc_b.w"], "fc_b"), b.tensor("fc_b.b", (4,))], "fc_b_bias")
    y = b.node("Relu", [y], "relu_b")
    b.node("Gemm", [y, b.tensor("fc_c.w", (3, 4)), b.tensor("fc_c.b", (3,))], "fc_c", out="out", transB=1)
    b.node("MatMul", ["x", b.tensor("score.w", (6,))], "score", out="score")
    return b.model([_fv("x", ["N", 6])], [_fv("out", ["N", 3]), _fv("score", ["N"])], opset)


def batchnorm_cases(*, opset: int = 17) -> onnx.ModelProto:
    """One BatchNormalization per folding case.

    x[N,4,6,6] -> ct (ConvTranspose group=2, no bias) -> bn_ct -> Relu -> out_ct     (folds)
    x -> plain (Conv, no bias) -> bn_plain -> out_plain                           (folds; bias created)
    x -> shared (Conv) -> bn_shared -> out_shared; shared_out is also a graph output  (kept)
    x -> dyn (Conv) -> bn_dyn(scale = graph input gamma) -> out_dyn                 (kept)
    """
    b = _Builder(6)
    ct = b.node("ConvTranspose", ["x", b.tensor("ct.w", (4, 3, 3, 3))], "ct", group=2, pads=[1] * 4)
    b.node("Relu", [b.bn(ct, 6, "bn_ct")], "relu_ct", out="out_ct")
    b.bn(
        b.node("Conv", ["x", b.tensor("plain.w", (5, 4, 3, 3))], "plain", pads=[1] * 4),
        5,
        "bn_plain",
        out="out_plain",
    )
    shared = b.node(
        "Conv",
        ["x", b.tensor("shared.w", (4, 4, 1, 1)), b.tensor("shared.b", (4,))],
        "shared",
        out="shared_out",
    )
    b.bn(shared, 4, "bn_shared", out="out_shared")
    dyn = b.node("Conv", ["x", b.tensor("dyn.w", (4, 4, 1, 1))], "dyn")
    params = [b.tensor(f"bn_dyn.{p}", (4,), 0.1) for p in ("bias", "mean")]
    b.const("bn_dyn.var", np.full(4, 0.8, np.float32))
    b.nodes.append(
        helper.make_node(
            "BatchNormalization", [dyn, "gamma", *params, "bn_dyn.var"], ["out_dyn"], name="bn_dyn"
        )
    )
    return b.model(
        [_fv("x", ["N", 4, 6, 6]), _fv("gamma", [4])],
        [
            _fv("out_ct", ["N", 6, 6, 6]),
            _fv("out_plain", ["N", 5, 6, 6]),
            _fv("out_shared", ["N", 4, 6, 6]),
            _fv("shared_out", ["N", 4, 6, 6]),
            _fv("out_dyn", ["N", 4, 6, 6]),
        ],
        opset,
    )


def downsample_residual(*, opset: int = 17) -> onnx.ModelProto:
    """A ResNet downsampling block: the shortcut conv is the shallow branch, listed first.

    x[N,4,8,8] -> short (Conv 1x1) -----------------------------+
                                                                Add(down_add) -> Relu -> out
    x -> conv1 -> bn1 -> Relu -> conv2 -> bn2 ------------------+
    """
    b = _Builder(7)
    short = b.node("Conv", ["x", b.tensor("short.w", (4, 4, 1, 1))], "short")
    y = b.node(
        "Relu",
        [b.bn(b.node("Conv", ["x", b.tensor("c1.w", (4, 4, 3, 3))], "conv1", pads=[1] * 4), 4, "bn1")],
        "relu1",
    )
    y = b.bn(b.node("Conv", [y, b.tensor("c2.w", (4, 4, 3, 3))], "conv2", pads=[1] * 4), 4, "bn2")
    b.node("Relu", [b.node("Add", [short, y], "down_add")], "relu", out="out")
    return b.model([_fv("x", ["N", 4, 8, 8])], [_fv("out", ["N", 4, 8, 8])], opset)


def transformer_residual(*, opset: int = 17) -> onnx.ModelProto:
    """A pre-norm transformer's projection with its residual Add, through a PaddlePaddle-style Identity.

    x[N,T,8] -> proj (MatMul W[8,8]) -> Add(bias) -> Identity -> Add(res, x) -> out
    """
    b = _Builder(8)
    y = b.node(
        "Add",
        [b.node("MatMul", ["x", b.tensor("proj.w", (8, 8))], "proj"), b.tensor("proj.b", (8,))],
        "proj_bias",
    )
    y = b.node("Identity", [y], "proj_identity")
    b.node("Add", [y, "x"], "res", out="out")
    return b.model([_fv("x", ["N", "T", 8])], [_fv("out", ["N", "T", 8])], opset)


def computed_weight_conv(*, opset: int = 17) -> onnx.ModelProto:
    """A convolution whose weight and bias are computed from constants in the graph, as zoo exports do.

    ConstantOfShape([4*3*3*3]) -> Mul(values) -> Reshape([4,3,3,3]) -> conv.w
    ConstantOfShape([4]) (value 0.1)                                -> conv.b
    x[N,3,8,8] -> conv (Conv 3x3) -> Relu -> GlobalAveragePool -> out[N,4,1,1]
    """
    b = _Builder(9)
    count = b.const("w_count", np.array([4 * 3 * 3 * 3], np.int64))
    ones = b.node(
        "ConstantOfShape", [count], "w_ones", value=numpy_helper.from_array(np.array([1.0], np.float32))
    )
    flat = b.node("Mul", [ones, b.tensor("w_values", (4 * 3 * 3 * 3,))], "w_scale")
    weight = b.node("Reshape", [flat, b.const("w_shape", np.array([4, 3, 3, 3], np.int64))], "w_reshape")
    bias = b.node(
        "ConstantOfShape",
        [b.const("b_count", np.array([4], np.int64))],
        "b_fill",
        value=numpy_helper.from_array(np.array([0.1], np.float32)),
    )
    y = b.node("Relu", [b.node("Conv", ["x", weight, bias], "conv", pads=[1] * 4)], "relu")
    b.node("GlobalAveragePool", [y], "pool", out="out")
    return b.model([_fv("x", ["N", 3, 8, 8])], [_fv("out", ["N", 4, 1, 1])], opset)


def runtime_weight_conv(*, opset: int = 17) -> onnx.ModelProto:
    """A convolution whose weight is a graph input: nothing has a constant weight to quantize.

    x[N,3,8,8], w[4,3,3,3] (graph input) -> conv -> Relu -> out[N,4,8,8]
    """
    b = _Builder(10)
    b.node("Relu", [b.node("Conv", ["x", "w"], "conv", pads=[1] * 4)], "relu", out="out")
    return b.model([_fv("x", ["N", 3, 8, 8]), _fv("w", [4, 3, 3, 3])], [_fv("out", ["N", 4, 8, 8])], opset)


def pooled_matmul_head(*, opset: int = 17) -> onnx.ModelProto:
    """Integer regions through data-movement ops, a MaxPool and two chained MatMuls.

    x[N,3,8,8] -> conv (Conv, bias as a per-channel Add [1,4,1,1]) -> conv_bias -> Identity -> Relu
      -> MaxPool 2x2 -> Reshape [N,64] -> fc1 (MatMul W[64,16]) -> Relu -> fc2 (MatMul W[16,5]) -> out[N,5]
    """
    b = _Builder(11)
    y = b.node("Conv", ["x", b.tensor("conv.w", (4, 3, 3, 3))], "conv", pads=[1] * 4)
    y = b.node("Add", [y, b.tensor("conv.b", (1, 4, 1, 1), 0.05)], "conv_bias")
    y = b.node("Identity", [y], "conv_identity")
    y = b.node("Relu", [y], "relu")
    y = b.node("MaxPool", [y], "pool", kernel_shape=[2, 2], strides=[2, 2])
    y = b.node("Reshape", [y, b.const("flat_shape", np.array([0, 64], np.int64))], "flatten")
    y = b.node("Relu", [b.node("MatMul", [y, b.tensor("fc1.w", (64, 16), 0.2)], "fc1")], "fc1_relu")
    b.node("MatMul", [y, b.tensor("fc2.w", (16, 5), 0.3)], "fc2", out="out")
    return b.model([_fv("x", ["N", 3, 8, 8])], [_fv("out", ["N", 5])], opset)


def yolov8_style_head(*, opset: int = 17) -> onnx.ModelProto:
    """A YOLOv8-export-shaped head: a DFL box branch and a sigmoid class branch joined by one Concat.

    Carries the Casts exporters write: a float-to-float ``Cast(to=FLOAT)`` after the stem and the
    stride computed from the input's shape (``Shape -> Gather -> Cast(to=FLOAT) -> Div``).

    x[1,3,16,16] -> stem (Conv s2) -> Cast(FLOAT) -> Relu -> feat[1,8,8,8]
      box: Conv 8->4*16 -> Reshape [1,4,16,64] -> Transpose -> Softmax(bins) -> Conv(arange 0..15)
           -> Reshape [1,4,64] -> Mul(stride) ---------------------------------+
      cls: Conv 8->3 -> Reshape [1,3,64] -> Sigmoid -------------------------- Concat(axis 1) -> out[1,7,64]
    """
    b = _Builder(12)
    stem = b.node(
        "Conv",
        ["x", b.tensor("stem.w", (8, 3, 3, 3)), b.tensor("stem.b", (8,))],
        "stem",
        pads=[1] * 4,
        strides=[2, 2],
    )
    feat = b.node("Relu", [b.node("Cast", [stem], "stem_cast", to=TensorProto.FLOAT)], "stem_relu")

    dist = b.node("Conv", [feat, b.tensor("box.w", (64, 8, 1, 1)), b.tensor("box.b", (64,))], "box_conv")
    dist = b.node("Reshape", [dist, b.const("box.shape", np.array([1, 4, 16, 64], np.int64))], "box_reshape")
    dist = b.node("Transpose", [dist], "box_transpose", perm=[0, 2, 1, 3])
    dist = b.node("Softmax", [dist], "dfl_softmax", axis=1)
    bins = np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)
    dist = b.node("Conv", [dist, b.const("dfl.w", bins)], "dfl_conv")
    dist = b.node("Reshape", [dist, b.const("dfl.shape", np.array([1, 4, 64], np.int64))], "dfl_reshape")

    height = b.node(
        "Gather",
        [b.node("Shape", ["x"], "in_shape"), b.const("h_axis", np.array(2, np.int64))],
        "in_height",
        axis=0,
    )
    height = b.node("Cast", [height], "height_cast", to=TensorProto.FLOAT)
    stride = b.node("Div", [height, b.const("grid", np.array(8.0, np.float32))], "stride")
    boxes = b.node("Mul", [dist, stride], "box_pixels")

    cls = b.node("Conv", [feat, b.tensor("cls.w", (3, 8, 1, 1)), b.tensor("cls.b", (3,))], "cls_conv")
    cls = b.node("Reshape", [cls, b.const("cls.shape", np.array([1, 3, 64], np.int64))], "cls_reshape")
    scores = b.node("Sigmoid", [cls], "cls_sigmoid")
    b.node("Concat", [boxes, scores], "head_concat", out="out", axis=1)
    return b.model([_fv("x", [1, 3, 16, 16])], [_fv("out", [1, 7, 64])], opset)
