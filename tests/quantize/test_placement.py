"""Q/DQ placement: which tensors need ranges and where Q/DQ lands in the output graph."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest

from service.errors import BadInput
from service.quantize.bn_fold import fold_batchnorm
from service.quantize.skip import SkipSpec
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.model_factory import resnet_block_classifier, two_input_adder
from tests.quantize import graphs
from tests.quantize.support import (
    amax_by_running,
    assert_tensorrt_placement,
    attr,
    is_quantized_input,
    node,
    producers,
    weight_dequantize,
)

CLASSIFIER_TENSORS = [
    "input",
    "stem_relu_out",
    "block_relu1_out",
    "block_relu2_out",
    "flatten_out",
    "fc1_relu_out",
]


def _quantized(model: onnx.ModelProto, skip: SkipSpec | None = None, **kwargs: bool) -> onnx.ModelProto:
    amax = dict.fromkeys(tensors_to_calibrate(model, skip, **kwargs), 4.0)
    return qdq_model_from_scales(model, amax, skip=skip, **kwargs).model


@pytest.mark.parametrize("opset", [9, 13, 17, 21])
def test_classifier_needs_ranges_for_weighted_inputs_and_the_residual(opset: int) -> None:
    model = resnet_block_classifier(opset=opset)

    tensors = tensors_to_calibrate(model)

    assert tensors == CLASSIFIER_TENSORS
    names = {v for n in model.graph.node for v in n.output} | {i.name for i in model.graph.input}
    assert set(tensors) <= names  # collectable on the model as uploaded, even below opset 13


def test_batchnorm_folding_keeps_every_tensor_to_calibrate() -> None:
    model = resnet_block_classifier()

    assert tensors_to_calibrate(fold_batchnorm(model)) == tensors_to_calibrate(model)


def test_residual_add_quantizes_the_skip_input_and_not_the_conv_branch() -> None:
    qdq = _quantized(resnet_block_classifier())
    add = node(qdq, "block_add")

    assert not is_quantized_input(qdq, add.input[0])  # block_bn2_out: the branch TensorRT fuses
    assert is_quantized_input(qdq, add.input[1])  # stem_relu_out: the residual
    assert producers(qdq)[add.input[0]].op_type == "BatchNormalization"


def test_shared_tensor_gets_one_quantize_and_one_dequantize_per_consumer() -> None:
    qdq = _quantized(resnet_block_classifier())
    made_by = producers(qdq)

    conv_dq = made_by[node(qdq, "block_conv1").input[0]]
    add_dq = made_by[node(qdq, "block_add").input[1]]
    assert conv_dq.name != add_dq.name
    assert conv_dq.input[0] == add_dq.input[0]
    assert sum(n.op_type == "QuantizeLinear" and n.input[0] == "stem_relu_out" for n in qdq.graph.node) == 1


@pytest.mark.parametrize("opset", [9, 13, 17, 21])
def test_classifier_follows_tensorrt_placement_rules(opset: int) -> None:
    model = resnet_block_classifier(opset=opset)
    result = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 3.0))

    onnx.checker.check_model(result.model, full_check=True)
    assert result.quantized_nodes == ("stem_conv", "block_conv1", "block_conv2", "head_conv", "fc1", "fc2")
    assert_tensorrt_placement(result.model, result.quantized_nodes)
    assert max(o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")) >= 13


def test_two_conv_branches_quantize_only_the_second_add_input() -> None:
    model = graphs.two_conv_residual()
    qdq = _quantized(model)
    add = node(qdq, "res_add")

    assert tensors_to_calibrate(model) == ["x", "conv_b_out"]
    assert not is_quantized_input(qdq, add.input[0])
    assert is_quantized_input(qdq, add.input[1])


def test_add_after_relu_is_not_a_fusable_residual() -> None:
    # conv -> relu -> add(bias_map): TensorRT cannot fuse that Add into the conv, so it stays float.
    model = two_input_adder()

    assert tensors_to_calibrate(model) == ["image"]
    qdq = _quantized(model)
    assert not any(is_quantized_input(qdq, name) for name in node(qdq, "add").input)


def test_weight_axes_follow_each_layout() -> None:
    mlp = _quantized(graphs.mlp_weight_layouts())
    head = _quantized(graphs.deconv_sigmoid_head(), quantize_heads=True)
    classifier = _quantized(resnet_block_classifier())

    def axis(model: onnx.ModelProto, name: str) -> object:
        dq = weight_dequantize(model, node(model, name).input[1])
        assert dq is not None
        return attr(dq, "axis")

    assert axis(classifier, "stem_conv") == 0  # Conv [C_out, C_in, k, k]
    assert axis(classifier, "fc1") == 0  # Gemm transB=1: [N, K]
    assert axis(mlp, "fc_a") == 1  # Gemm transB=0: [K, N]
    assert axis(mlp, "fc_b") == 1  # MatMul [K, N]
    assert axis(mlp, "score") is None  # 1-D MatMul weight: per tensor
    assert axis(head, "up") == 1  # ConvTranspose [C_in, C_out / group, k, k]


def test_weights_fed_through_identity_and_constant_nodes_are_quantized() -> None:
    mlp = _quantized(graphs.mlp_weight_layouts())

    for name in ("fc_a", "fc_b"):
        assert weight_dequantize(mlp, node(mlp, name).input[1]) is not None
    assert not [n for n in mlp.graph.node if n.op_type in ("Constant", "Identity")]


def test_sigmoid_head_stays_float_unless_asked() -> None:
    model = graphs.deconv_sigmoid_head()

    default = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 2.0))
    assert default.kept_nodes == ("head",)
    assert not is_quantized_input(default.model, node(default.model, "head").input[0])

    forced = qdq_model_from_scales(
        model, dict.fromkeys(tensors_to_calibrate(model, quantize_heads=True), 2.0), quantize_heads=True
    )
    assert forced.kept_nodes == ()
    assert is_quantized_input(forced.model, node(forced.model, "head").input[0])


def test_softmax_classifier_keeps_its_last_gemm_float() -> None:
    result = qdq_model_from_scales(
        resnet_block_classifier(softmax=True), dict.fromkeys(CLASSIFIER_TENSORS, 2.0)
    )

    assert result.kept_nodes == ("fc2",)
    assert "fc1_relu_out" not in result.activation_tensors


def test_graph_output_that_feeds_an_int8_layer_is_still_returned_in_float() -> None:
    qdq = _quantized(graphs.deconv_sigmoid_head())

    assert producers(qdq)["features"].op_type == "Relu"
    assert is_quantized_input(qdq, node(qdq, "up").input[0])
    assert_tensorrt_placement(qdq, ["enc", "up"])


def test_skipped_layers_lose_their_qdq_and_their_ranges() -> None:
    model = resnet_block_classifier()
    skip = SkipSpec.parse(["first", "Gemm"])

    tensors = tensors_to_calibrate(model, skip)
    result = qdq_model_from_scales(model, dict.fromkeys(tensors, 1.0), skip=skip)

    assert "input" not in tensors and "flatten_out" not in tensors and "fc1_relu_out" not in tensors
    assert result.kept_nodes == ("stem_conv", "fc1", "fc2")
    assert result.quantized_nodes == ("block_conv1", "block_conv2", "head_conv")
    assert node(result.model, "fc1").input[1] == "fc1.weight"
    assert_tensorrt_placement(result.model, result.quantized_nodes)


def test_explicitly_quantized_model_is_refused() -> None:
    model = resnet_block_classifier()
    qdq = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 1.0)).model

    with pytest.raises(BadInput, match="already contains DequantizeLinear, QuantizeLinear"):
        tensors_to_calibrate(qdq)


def test_classifier_amax_from_real_activations_names_existing_tensors() -> None:
    model = resnet_block_classifier(opset=9)
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)

    amax = amax_by_running(model, tensors_to_calibrate(model), [{"input": x}])

    assert all(value > 0 for value in amax.values())


def test_deeper_branch_is_fused_and_the_shortcut_conv_is_quantized() -> None:
    model = graphs.downsample_residual()
    qdq = _quantized(model)
    add = node(qdq, "down_add")

    assert tensors_to_calibrate(model) == ["x", "relu1_out", "short_out"]
    assert is_quantized_input(qdq, add.input[0])  # short: one conv deep
    assert not is_quantized_input(qdq, add.input[1])  # conv2 -> bn2: computed last, fused


def test_matmul_residual_through_bias_and_identity_quantizes_the_skip_input() -> None:
    qdq = _quantized(graphs.transformer_residual())
    add = node(qdq, "res")

    assert is_quantized_input(qdq, add.input[1])
    assert not is_quantized_input(qdq, add.input[0])
    readers = [
        n.name for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "x_quantized"
    ]
    assert len(readers) == 2  # one DQ for the MatMul, one for the Add


@pytest.mark.parametrize(
    "build",
    [
        resnet_block_classifier,
        two_input_adder,
        graphs.two_conv_residual,
        graphs.downsample_residual,
        graphs.transformer_residual,
        graphs.mlp_weight_layouts,
    ],
)
def test_static_fusion_analysis_finds_no_blockers_in_our_placement(
    build: Callable[[], onnx.ModelProto],
) -> None:
    fusions = pytest.importorskip("service.onnx_graph.fusions")
    model = build()
    qdq = _quantized(model)

    analysis = fusions.analyze_fusions(qdq)

    assert analysis.explicit_quantization
    assert [p.blockers for p in analysis.patterns if not p.int8_fusable] == []
    assert analysis.summary.total >= 1
