"""Static fusion analysis on the onnx model zoo's graphs, trained PP-OCR models and hand-made Q/DQ graphs."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.onnx_graph.fusion_results import FusionAnalysis, FusionPattern
from service.onnx_graph.fusions import analyze_fusions
from tests.model_factory import resnet_block_classifier, two_input_adder


class Net:
    """A tiny graph builder for hand-made fusion cases.

    Tensors are NCHW float with 4 channels; weights are seeded. ``qdq(x)`` inserts an activation
    QuantizeLinear -> DequantizeLinear pair, ``conv(..., quantized=True)`` reads its weights through a
    per-channel DequantizeLinear of int8 values, as a QAT export does.
    """

    def __init__(self, opset: int = 17) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])]

    def input(self, name: str, shape: list[int]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def qdq(self, x: str, name: str) -> str:
        scale = self.const(f"{name}.scale", np.array(0.05, np.float32))
        zero = self.const(f"{name}.zero", np.array(0, np.int8))
        q = self.node("QuantizeLinear", [x, scale, zero], f"{name}_q")
        return self.node("DequantizeLinear", [q, scale, zero], f"{name}_dq")

    def weights(self, name: str, shape: tuple[int, ...], quantized: bool) -> str:
        if not quantized:
            return self.const(name, (self.rng.standard_normal(shape) * 0.1).astype(np.float32))
        values = self.const(f"{name}.int8", self.rng.integers(-127, 128, shape).astype(np.int8))
        scale = self.const(f"{name}.scale", np.full(shape[0], 0.01, np.float32))
        zero = self.const(f"{name}.zero", np.zeros(shape[0], np.int8))
        return self.node("DequantizeLinear", [values, scale, zero], f"{name}_dq", axis=0)

    def conv(self, x: str, name: str, *, quantized: bool = False, op: str = "Conv") -> str:
        w = self.weights(f"{name}.weight", (4, 4, 3, 3), quantized)
        b = self.const(f"{name}.bias", np.zeros(4, np.float32))
        return self.node(op, [x, w, b], name, pads=[1, 1, 1, 1])

    def bn(self, x: str, name: str, *, scale: str | None = None) -> str:
        params = [
            scale or self.const(f"{name}.scale", np.ones(4, np.float32)),
            self.const(f"{name}.bias", np.zeros(4, np.float32)),
            self.const(f"{name}.mean", np.zeros(4, np.float32)),
            self.const(f"{name}.var", np.ones(4, np.float32)),
        ]
        return self.node("BatchNormalization", [x, *params], name)

    def model(self, *outputs: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "net",
            self.inputs,
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8 if self.opset <= 17 else 10
        # Outputs are declared without shapes; shape inference fills them in so the checker accepts them.
        model = onnx.shape_inference.infer_shapes(model)
        onnx.checker.check_model(model)
        return model


def _kinds(analysis: FusionAnalysis) -> dict[str, int]:
    return {entry.kind: entry.count for entry in analysis.summary.kinds}


def _only(analysis: FusionAnalysis) -> FusionPattern:
    assert len(analysis.patterns) == 1, analysis.patterns
    return analysis.patterns[0]


# --- real graphs -------------------------------------------------------------------------------------


def test_zoo_resnet50_has_33_conv_bn_relu_and_16_conv_bn_add(zoo_model_path: Callable[[str], Path]) -> None:
    analysis = analyze_fusions(onnx.load(str(zoo_model_path("resnet50"))))
    # 53 convolutions: 33 end in Relu, 16 feed a residual Sum, 4 are the downsampling shortcuts.
    assert _kinds(analysis) == {"conv_bn_relu": 33, "conv_bn_add": 16, "conv_bn": 4}
    assert analysis.summary.blocked == 0 and not analysis.explicit_quantization
    adds = analysis.of_kind("conv_bn_add")
    assert all(p.op_types == ("Conv", "BatchNormalization", "Sum", "Relu") and p.residual_input for p in adds)
    # The first downsampling block: the Sum goes to the three-conv branch, computed last; the shortcut
    # conv is a conv_bn of its own (the split TensorRT-RTX's FP32 plan makes: CorrMulAddAddRelu + CorrMulAdd).
    first_add = next(p for p in adds if "n14" in p.nodes)
    assert first_add.nodes == ("n10", "n11", "n14", "n15") and first_add.residual_input == "r13"
    assert ("n12", "n13") in [p.nodes for p in analysis.of_kind("conv_bn")]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bvlc_alexnet", {"conv_relu": 5, "gemm_relu": 2}),  # 5 convs + fc6/fc7 with ReLU; fc8 feeds Softmax
        ("zfnet512", {"conv_relu": 5, "gemm_relu": 2}),
        ("vgg19", {"conv_relu": 16, "gemm_relu": 2}),
        ("squeezenet", {"conv_relu": 26}),  # every conv, the classifier conv included, ends in ReLU
        ("inception_v1", {"conv_relu": 57}),
        ("inception_v2", {"conv_bn_relu": 69}),
        ("densenet121", {"conv_bn_relu": 59}),  # stem + 58 bottleneck convs; BN-ReLU precede the others
        ("shufflenet", {"conv_bn_relu": 17, "conv_bn": 19, "conv_bn_add": 13}),
    ],
)
def test_zoo_models_give_the_patterns_their_architecture_implies(
    zoo_model_path: Callable[[str], Path], name: str, expected: dict[str, int]
) -> None:
    model = onnx.load(str(zoo_model_path(name)))
    analysis = analyze_fusions(model)
    assert _kinds(analysis) == expected
    assert analysis.summary.blocked == 0
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    assert sum(n for kind, n in expected.items() if kind.startswith("conv")) <= convs


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "shufflenet", "inception_v2"])
def test_no_node_belongs_to_two_patterns(zoo_model_path: Callable[[str], Path], name: str) -> None:
    analysis = analyze_fusions(onnx.load(str(zoo_model_path(name))))
    owners = Counter(node for pattern in analysis.patterns for node in pattern.nodes)
    assert max(owners.values()) == 1


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_factory_resnet_block_gives_the_same_patterns_at_every_opset(opset: int) -> None:
    analysis = analyze_fusions(resnet_block_classifier(opset=opset))
    assert [(p.kind, p.nodes, p.activation) for p in analysis.patterns] == [
        ("conv_bn_relu", ("stem_conv", "stem_bn", "stem_relu"), "Relu"),
        ("conv_bn_relu", ("block_conv1", "block_bn1", "block_relu1"), "Relu"),
        ("conv_bn_add", ("block_conv2", "block_bn2", "block_add", "block_relu2"), "Relu"),
        ("conv_relu", ("head_conv", "head_relu6"), "Clip(0,6)"),  # bounds as attributes at 9, inputs from 11
        ("gemm_relu", ("fc1", "fc1_relu"), "Relu"),
    ]
    assert all(p.int8_fusable for p in analysis.patterns)
    assert analysis.of_kind("conv_bn_add")[0].residual_input == "stem_relu_out"


def test_fp32_residual_add_without_qdq_is_not_blocked() -> None:
    pattern = _only(analyze_fusions(two_input_adder()))
    assert pattern.kind == "conv_relu" and pattern.int8_fusable


def test_decomposed_hard_swish_in_a_trained_ppocr_model_is_not_taken_for_relu6(
    rapidocr_models_dir: Path,
) -> None:
    model = onnx.load(str(rapidocr_models_dir / "ch_ppocr_mobile_v2.0_cls_mobile.onnx"))
    analysis = analyze_fusions(model)
    # BN -> Add(3) -> Clip(0,6) -> Div(6) -> Mul(x): the BN output is read twice, so no ReLU6 pattern.
    assert not [p for p in analysis.patterns if p.activation == "Clip(0,6)"]
    assert {p.activation for p in analysis.of_kind("conv_act")} == {"HardSigmoid"}
    assert all(not p.int8_fusable for p in analysis.of_kind("conv_act"))
    assert _kinds(analysis)["conv_bn_add"] == 7


def test_paddle_identity_nodes_are_looked_through(rapidocr_models_dir: Path) -> None:
    model = onnx.load(str(rapidocr_models_dir / "PP-OCRv6_det_small.onnx"))
    analysis = analyze_fusions(model)
    relus = analysis.of_kind("conv_relu")
    # Conv -> Add(bias) -> Identity -> Relu: the Identity is skipped and not part of the pattern.
    assert len(relus) == 19
    assert all(p.op_types == ("Conv", "Add", "Relu") for p in relus)
    assert "deconv_relu" in _kinds(analysis)


# --- hand-made graphs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("opset", "bounds"), [(9, "attributes"), (13, "inputs")])
def test_clip_0_6_is_relu6_in_both_signatures(opset: int, bounds: str) -> None:
    net = Net(opset)
    c = net.conv("x", "conv")
    if bounds == "attributes":
        y = net.node("Clip", [c], "clip", min=0.0, max=6.0)
    else:
        y = net.node(
            "Clip",
            [c, net.const("lo", np.array(0, np.float32)), net.const("hi", np.array(6, np.float32))],
            "clip",
        )
    pattern = _only(analyze_fusions(net.model(y)))
    assert (pattern.kind, pattern.activation, pattern.int8_fusable) == ("conv_relu", "Clip(0,6)", True)


@pytest.mark.parametrize("opset", [9, 13])
def test_clip_0_1_is_an_activation_but_not_relu6(opset: int) -> None:
    net = Net(opset)
    c = net.conv("x", "conv")
    if opset < 11:
        y = net.node("Clip", [c], "clip", min=0.0, max=1.0)
    else:
        y = net.node(
            "Clip",
            [c, net.const("lo", np.array(0, np.float32)), net.const("hi", np.array(1, np.float32))],
            "clip",
        )
    pattern = _only(analyze_fusions(net.model(y)))
    assert (pattern.kind, pattern.activation, pattern.int8_fusable) == ("conv_act", "Clip(0,1)", True)


def test_clip_with_only_a_lower_bound_reads_as_unbounded_above() -> None:
    net = Net(13)
    y = net.node("Clip", [net.conv("x", "conv"), net.const("lo", np.array(0, np.float32))], "clip")
    assert _only(analyze_fusions(net.model(y))).activation == "Clip(0,inf)"


def test_sum_with_two_inputs_counts_as_a_residual_add() -> None:
    net = Net()
    y = net.node("Relu", [net.node("Sum", [net.bn(net.conv("x", "conv"), "bn"), "x"], "sum")], "relu")
    pattern = _only(analyze_fusions(net.model(y)))
    assert (pattern.kind, pattern.nodes, pattern.residual_input) == (
        "conv_bn_add",
        ("conv", "bn", "sum", "relu"),
        "x",
    )


def test_sum_with_three_inputs_is_not_a_residual_add() -> None:
    net = Net()
    y = net.node("Sum", [net.bn(net.conv("x", "conv"), "bn"), "x", "x"], "sum")
    assert _only(analyze_fusions(net.model(y))).kind == "conv_bn"


def test_add_fed_by_two_conv_bn_chains_goes_to_the_deeper_one() -> None:
    net = Net()
    shortcut = net.bn(net.conv("x", "short_conv"), "short_bn")
    main = net.bn(net.conv(net.node("Relu", [net.conv("x", "pre_conv")], "pre_relu"), "main_conv"), "main_bn")
    y = net.node("Add", [shortcut, main], "add")
    analysis = analyze_fusions(net.model(y))
    assert [(p.kind, p.nodes) for p in analysis.patterns] == [
        ("conv_bn", ("short_conv", "short_bn")),
        ("conv_relu", ("pre_conv", "pre_relu")),
        ("conv_bn_add", ("main_conv", "main_bn", "add")),
    ]


def test_silu_and_hard_swish_are_recognized_as_gated_activations() -> None:
    net = Net()
    c1 = net.conv("x", "conv1")
    silu = net.node("Mul", [c1, net.node("Sigmoid", [c1], "sigmoid")], "silu_mul")
    c2 = net.conv(silu, "conv2")
    hswish = net.node("Mul", [net.node("HardSigmoid", [c2], "hsig", alpha=1 / 6, beta=0.5), c2], "hswish_mul")
    analysis = analyze_fusions(net.model(hswish))
    assert [(p.kind, p.nodes, p.activation) for p in analysis.patterns] == [
        ("conv_act", ("conv1", "sigmoid", "silu_mul"), "SiLU"),
        ("conv_act", ("conv2", "hsig", "hswish_mul"), "HardSwish"),
    ]
    # x is read twice by the activation itself: that is not a multi-consumer blocker.
    assert all(not any("consumers" in b for b in p.blockers) for p in analysis.patterns)
    assert all("not one TensorRT documents" in p.blockers[0] for p in analysis.patterns)
    # Not "blocked": the INT8 convolution runs, the activation follows as a pointwise epilogue.
    assert [p.expected for p in analysis.patterns] == ["epilogue", "epilogue"]
    assert analysis.summary.blocked == 0
    assert analysis.to_dict()["summary"]["by_kind"]["conv_act"] == {
        "count": 2, "total": 2, "fused": 0, "epilogue": 2, "blocked": 0
    }  # fmt: skip


def test_matmul_with_constant_bias_add_and_relu_is_a_gemm_relu() -> None:
    net = Net()
    flat = net.node("Flatten", ["x"], "flatten")
    w = net.const("fc.weight", np.ones((256, 8), np.float32))
    y = net.node(
        "Relu",
        [
            net.node(
                "Add",
                [net.node("MatMul", [flat, w], "fc"), net.const("fc.bias", np.zeros(8, np.float32))],
                "fc_bias",
            )
        ],
        "relu",
    )
    pattern = _only(analyze_fusions(net.model(y)))
    assert (pattern.kind, pattern.nodes) == ("gemm_relu", ("fc", "fc_bias", "relu"))


def test_conv_transpose_patterns_are_deconv_kinds() -> None:
    net = Net()
    y = net.node("Relu", [net.bn(net.conv("x", "up", op="ConvTranspose"), "bn")], "relu")
    assert _only(analyze_fusions(net.model(y))).kind == "deconv_bn_relu"


def test_unnamed_nodes_are_reported_by_label() -> None:
    net = Net()
    c = net.conv("x", "conv")
    net.nodes.append(helper.make_node("Relu", [c], ["y"]))
    assert _only(analyze_fusions(net.model("y"))).nodes == ("conv", "Relu_y")


def test_qat_conv_bn_relu_with_qdq_only_on_conv_inputs_is_int8_fusable() -> None:
    net = Net()
    c1 = net.conv(net.qdq("x", "in"), "conv1", quantized=True)
    r1 = net.node("Relu", [net.bn(c1, "bn1")], "relu1")
    c2 = net.conv(net.qdq(r1, "mid"), "conv2", quantized=True)
    y = net.node("Relu", [net.node("Add", [net.bn(c2, "bn2"), net.qdq(r1, "res")], "add")], "relu2")
    analysis = analyze_fusions(net.model(y))
    assert analysis.explicit_quantization
    assert [(p.kind, p.nodes, p.int8_fusable, p.blockers) for p in analysis.patterns] == [
        ("conv_bn_relu", ("conv1", "bn1", "relu1"), True, ()),
        ("conv_bn_add", ("conv2", "bn2", "add", "relu2"), True, ()),
    ]
    assert analysis.patterns[1].residual_input == "res_dq_out"


def _conv_output_with_two_consumers() -> onnx.ModelProto:
    net = Net()
    c = net.conv("x", "conv")
    return net.model(
        net.node("Relu", [net.bn(c, "bn")], "relu"), net.node("MaxPool", [c], "pool", kernel_shape=[2, 2])
    )


def _bn_output_is_graph_output() -> onnx.ModelProto:
    net = Net()
    b = net.bn(net.conv("x", "conv"), "bn")
    return net.model(net.node("Relu", [b], "relu"), b)


def _bn_with_graph_input_scale() -> onnx.ModelProto:
    net = Net()
    b = net.bn(net.conv("x", "conv"), "bn", scale=net.input("bn_scale", [4]))
    return net.model(net.node("Relu", [b], "relu"))


def _bn_in_training_mode() -> onnx.ModelProto:
    net = Net(15)
    c = net.conv("x", "conv")
    params = [net.const(f"bn.{p}", np.ones(4, np.float32)) for p in ("scale", "bias", "mean", "var")]
    net.nodes.append(
        helper.make_node(
            "BatchNormalization", [c, *params], ["bn_out", "run_mean", "run_var"], name="bn", training_mode=1
        )
    )
    return net.model(net.node("Relu", ["bn_out"], "relu"))


def _qdq_between_conv_and_bn() -> onnx.ModelProto:
    net = Net()
    c = net.conv(net.qdq("x", "in"), "conv", quantized=True)
    return net.model(net.node("Relu", [net.bn(net.qdq(c, "mid"), "bn")], "relu"))


def _qdq_between_bn_and_relu() -> onnx.ModelProto:
    net = Net()
    b = net.bn(net.conv(net.qdq("x", "in"), "conv", quantized=True), "bn")
    return net.model(net.node("Relu", [net.qdq(b, "mid")], "relu"))


def _residual_without_qdq() -> onnx.ModelProto:
    net = Net()
    b = net.bn(net.conv(net.qdq("x", "in"), "conv", quantized=True), "bn")
    return net.model(net.node("Add", [b, "x"], "add"))


def _qdq_between_branch_and_add() -> onnx.ModelProto:
    net = Net()
    b = net.bn(net.conv(net.qdq("x", "in"), "conv", quantized=True), "bn")
    return net.model(net.node("Add", [net.qdq(b, "mid"), net.qdq("x", "res")], "add"))


def _leaky_relu() -> onnx.ModelProto:
    net = Net()
    return net.model(net.node("LeakyRelu", [net.conv("x", "conv")], "leaky", alpha=0.1))


def _conv_input_not_quantized() -> onnx.ModelProto:
    net = Net()
    return net.model(net.node("Relu", [net.conv("x", "conv", quantized=True)], "relu"))


def _conv_weights_not_quantized() -> onnx.ModelProto:
    net = Net()
    return net.model(net.node("Relu", [net.conv(net.qdq("x", "in"), "conv")], "relu"))


def _bias_through_dequantize() -> onnx.ModelProto:
    net = Net()
    w = net.weights("conv.weight", (4, 4, 3, 3), quantized=True)
    bias_values = net.const("conv.bias.int32", np.zeros(4, np.int32))
    bias_scale = net.const("conv.bias.scale", np.full(4, 0.0005, np.float32))
    bias = net.node("DequantizeLinear", [bias_values, bias_scale], "bias_dq", axis=0)
    c = net.node("Conv", [net.qdq("x", "in"), w, bias], "conv", pads=[1, 1, 1, 1])
    return net.model(net.node("Relu", [c], "relu"))


def _clip_with_input_bound() -> onnx.ModelProto:
    net = Net(13)
    high = net.input("high", [])
    return net.model(
        net.node("Clip", [net.conv("x", "conv"), net.const("lo", np.array(0, np.float32)), high], "clip")
    )


# (kind of the conv's pattern, graph builder, regex one of its blockers must match)
BLOCKER_CASES = [
    (
        "conv_bn_relu",
        _conv_output_with_two_consumers,
        r"'conv_out' \(output of Conv 'conv'\) has 2 consumers \(bn, pool\)",
    ),
    (
        "conv_bn_relu",
        _bn_output_is_graph_output,
        r"2 consumers \(relu, graph output\).*Relu 'relu' cannot be fused",
    ),
    (
        "conv_bn_relu",
        _bn_with_graph_input_scale,
        r"BatchNormalization 'bn' takes non-constant scale 'bn_scale'",
    ),
    ("conv_bn_relu", _bn_in_training_mode, r"BatchNormalization 'bn' runs in training mode"),
    (
        "conv_bn_relu",
        _qdq_between_conv_and_bn,
        r"'mid_q' -> DequantizeLinear 'mid_dq' sit between Conv 'conv' and Batch",
    ),
    (
        "conv_bn_relu",
        _qdq_between_bn_and_relu,
        r"between BatchNormalization 'bn' and Relu 'relu': TensorRT cannot",
    ),
    (
        "conv_bn_add",
        _residual_without_qdq,
        r"residual input 'x' of Add 'add' carries no Q/DQ: TensorRT then cannot",
    ),
    (
        "conv_bn_add",
        _qdq_between_branch_and_add,
        r"between BatchNormalization 'bn' and Add 'add': TensorRT cannot",
    ),
    ("conv_act", _leaky_relu, r"activation LeakyRelu \('leaky'\) is not one TensorRT documents fusing"),
    ("conv_relu", _conv_input_not_quantized, r"the input 'x' of Conv 'conv' is not quantized"),
    ("conv_relu", _conv_weights_not_quantized, r"the weights 'conv.weight' of Conv 'conv' are not quantized"),
    (
        "conv_relu",
        _bias_through_dequantize,
        r"bias 'bias_dq_out' of Conv 'conv' goes through DequantizeLinear",
    ),
    ("conv_act", _clip_with_input_bound, r"Clip 'clip' takes non-constant bounds"),
]


ACTIVATION_ONLY = (_leaky_relu, _clip_with_input_bound)


@pytest.mark.parametrize(
    ("kind", "build", "blocker"), BLOCKER_CASES, ids=[case[1].__name__[1:] for case in BLOCKER_CASES]
)
def test_each_blocker_is_reported_with_a_readable_reason(
    kind: str, build: Callable[[], onnx.ModelProto], blocker: str
) -> None:
    analysis = analyze_fusions(build())
    pattern = next(p for p in analysis.patterns if p.anchor == "conv")
    assert pattern.kind == kind
    assert not pattern.int8_fusable
    assert any(re.search(blocker, text) for text in pattern.blockers), pattern.blockers
    # Only the activation in the way: the convolution still runs in INT8, the activation after it.
    outcome = "epilogue" if build in ACTIVATION_ONLY else "blocked"
    assert pattern.expected == outcome and re.search(blocker, pattern.reason), pattern.reason
    assert analysis.summary.blocked_count(kind) == (outcome == "blocked")
    assert analysis.to_dict()["summary"]["by_kind"][kind][outcome] == 1


def test_summary_counts_patterns_and_blocked_ones_per_kind_and_in_total() -> None:
    analysis = analyze_fusions(_residual_without_qdq())
    assert analysis.summary.total == 1 and analysis.summary.blocked == 1
    assert analysis.summary.count("conv_bn_add") == 1 and analysis.summary.count("conv_relu") == 0


def test_to_dict_is_json_ready_and_round_trips(zoo_model_path: Callable[[str], Path]) -> None:
    analysis = analyze_fusions(_qdq_between_conv_and_bn())
    data = json.loads(json.dumps(analysis.to_dict()))
    assert set(data) == {"patterns", "summary"}
    assert data["summary"] == {
        "explicit_quantization": True,
        "total": 1,
        "blocked": 1,
        "fused": 0,
        "epilogue": 0,
        "by_kind": {"conv_bn_relu": {"count": 1, "total": 1, "fused": 0, "epilogue": 0, "blocked": 1}},
    }
    assert (
        data["patterns"][0]["expected"] == "blocked" and "sit between Conv" in data["patterns"][0]["reason"]
    )
    assert data["patterns"][0]["nodes"] == ["conv", "bn", "relu"]
    assert FusionAnalysis.from_dict(data) == analysis
    resnet = analyze_fusions(onnx.load(str(zoo_model_path("resnet50"))))
    assert FusionAnalysis.from_dict(json.loads(json.dumps(resnet.to_dict()))) == resnet


@pytest.mark.timeout(20)
def test_a_graph_of_several_thousand_nodes_is_analyzed_whole() -> None:
    net = Net()
    x = "x"
    for block in range(400):  # 400 x (Conv, BN, Relu, Add, and a 2-node shortcut branch) = 2400 nodes
        y = net.node("Relu", [net.bn(net.conv(x, f"c{block}"), f"b{block}")], f"r{block}")
        x = net.node(
            "Add", [y, net.node("Neg", [net.node("Abs", [x], f"abs{block}")], f"neg{block}")], f"a{block}"
        )
    analysis = analyze_fusions(net.model(x))
    assert analysis.summary.count("conv_bn_relu") == 400
