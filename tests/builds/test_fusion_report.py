"""Fusion verification against layer reports mirroring real TensorRT-RTX and ONNX Runtime output.

The hand-made reports copy, layer for layer, the ``Layers:`` dumps TensorRT-RTX 1.7.1 printed for
``tests.model_factory.resnet_block_classifier()`` built in FP32 and, with Q/DQ on every Conv/Gemm input
and the residual input, in INT8 (names, types, datatypes and ``[ONNX Layer: ...]`` metadata as parsed by
``service.backends.layer_report``). Real ONNX Runtime optimized graphs of the zoo's ResNet-50 and one
real TensorRT-RTX FP32 build of it (through the backend) are checked end to end.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from service.backends.base import BuildSpec, BuiltEngine, EngineLayer, LayerPrecision, LayerReport
from service.backends.layer_report import layer_report_from_optimized_graph
from service.builds.fusion_report import FusionVerification, PatternVerification, verify_fusions
from service.onnx_graph.fusion_results import FusionAnalysis, FusionPattern
from service.onnx_graph.fusions import analyze_fusions
from tests.model_factory import resnet_block_classifier


def _layer(
    name: str,
    kind: str,
    precision: LayerPrecision,
    nodes: tuple[str, ...] = (),
    inputs: tuple[str, ...] = ("fp32",),
    outputs: tuple[str, ...] = ("fp32",),
    reformat: bool = False,
) -> EngineLayer:
    return EngineLayer(name, kind, precision, inputs, outputs, nodes, reformat)


# TensorRT-RTX 1.7.1, resnet_block_classifier() in FP32.
RTX_FP32 = (
    _layer("__mye589_0_myl0_0", "shape_call", "other", inputs=(), outputs=()),
    _layer("__myl_Move_myl0_1", "kgen", "fp32", reformat=True),
    _layer("__myl_CorrMulAddRelu_myl0_2", "runtime_fusion", "fp32", ("stem_conv", "stem_bn", "stem_relu")),
    _layer(
        "__myl_CorrMulAddRelu_myl0_3", "runtime_fusion", "fp32", ("block_conv1", "block_bn1", "block_relu1")
    ),
    _layer(
        "__myl_CorrMulAddAddRelu_myl0_4",
        "runtime_fusion",
        "fp32",
        ("block_conv2", "block_bn2", "block_add", "block_relu2"),
        inputs=("fp32", "fp32"),
    ),
    _layer("head_conv_myl0_5", "correlation", "fp32", ("head_conv", "head_relu6")),
    _layer("__myl_TranMean_myl0_6", "kgen", "fp32", ("pool",)),
    _layer("__myl_FcAddRelu_myl0_7", "runtime_fusion", "fp32", ("fc1", "fc1_relu")),
    _layer("__myl_FcAdd_myl0_8", "runtime_fusion", "fp32", ("fc2",)),
)

# The same model with Q/DQ, built by TensorRT-RTX: each Conv/Gemm is named by its input quantizer,
# its INT8 correlation/gemm kernel and its kgen epilogue.
RTX_INT8 = (
    _layer("__mye929_0_myl0_0", "shape_call", "other", inputs=(), outputs=()),
    _layer(
        "__myl_MulMinMaxRounCastReplConc_myl0_1",
        "kgen",
        "fp32",
        ("qs1_Q", "stem_conv", "qs1_DQ", "stem_conv.weight_WDQ"),
        outputs=("int8",),
    ),
    _layer(
        "stem_conv_myl0_2", "correlation", "int8", ("stem_conv", "qs1_DQ", "stem_conv.weight_WDQ"), ("int8",)
    ),
    _layer(
        "__myl_MulAddReluMulMinMaxRounCast_myl0_3",
        "kgen",
        "fp32",
        ("stem_bn", "stem_conv", "qs4_Q", "stem_relu"),
        outputs=("int8",),
    ),
    _layer(
        "block_conv1_myl0_4",
        "correlation",
        "int8",
        ("block_conv1", "qs4_DQ", "block_conv1.weight_WDQ"),
        ("int8",),
    ),
    _layer(
        "__myl_MulAddReluMulMinMaxRounCast_myl0_5",
        "kgen",
        "fp32",
        ("block_bn1", "block_conv1", "qs3_Q", "block_relu1"),
        outputs=("int8",),
    ),
    _layer(
        "block_conv2_myl0_6",
        "correlation",
        "int8",
        ("block_conv2", "qs3_DQ", "block_conv2.weight_WDQ"),
        ("int8",),
    ),
    _layer(
        "__myl_CastMulMulAddAddReluMulMinMaxRounCast_myl0_7",
        "kgen",
        "mixed",
        ("block_bn2", "block_conv2", "block_add", "block_relu2", "qs4_DQ", "qs5_Q"),
        inputs=("int8", "fp32"),
        outputs=("int8",),
    ),
    _layer(
        "head_conv_myl0_8", "correlation", "int8", ("head_conv", "qs5_DQ", "head_conv.weight_WDQ"), ("int8",)
    ),
    _layer(
        "__myl_MulAddMaxMinMeanMulMinMaxRounCast_myl0_9",
        "kgen",
        "fp32",
        ("head_conv", "head_relu6", "pool", "qs6_Q"),
        outputs=("int8",),
    ),
    _layer("fc1_myl0_10", "gemm", "int8", ("fc1", "qs6_DQ", "fc1.weight_WDQ"), ("int8",)),
    _layer(
        "__myl_MulAddReluMulMinMaxRounCast_myl0_11",
        "kgen",
        "fp32",
        ("fc1", "qs6_DQ", "fc1.weight_WDQ", "qs7_Q", "fc1_relu"),
        outputs=("int8",),
    ),
    _layer("fc2_myl0_12", "gemm", "int8", ("fc2", "qs7_DQ", "fc2.weight_WDQ"), ("int8",)),
    _layer("__myl_MulAdd_myl0_13", "kgen", "fp32", ("fc2", "qs7_DQ", "fc2.weight_WDQ")),
)


@pytest.fixture(scope="module")
def block_analysis() -> FusionAnalysis:
    # The Q/DQ copy TensorRT-RTX built has the same compute node names, so the same patterns.
    return analyze_fusions(resnet_block_classifier())


def _by_anchor(verification: FusionVerification, anchor: str) -> PatternVerification:
    return next(entry for entry in verification.patterns if entry.pattern.anchor == anchor)


def test_fp32_plan_fuses_every_pattern_into_one_layer(block_analysis: FusionAnalysis) -> None:
    result = verify_fusions(block_analysis, LayerReport(RTX_FP32, "builder_log"), backend="tensorrt-rtx")
    assert [(e.pattern.kind, e.status, e.fused_as, e.precision) for e in result.patterns] == [
        ("conv_bn_relu", "fused", "runtime_fusion", "fp32"),
        ("conv_bn_relu", "fused", "runtime_fusion", "fp32"),
        ("conv_bn_add", "fused", "runtime_fusion", "fp32"),
        ("conv_relu", "fused", "correlation", "fp32"),
        ("gemm_relu", "fused", "runtime_fusion", "fp32"),
    ]
    assert all(e.fused and e.explanation == "" and not e.inferred for e in result.patterns)
    assert _by_anchor(result, "block_conv2").layers == ("__myl_CorrMulAddAddRelu_myl0_4",)
    summary = result.summary
    assert (summary.total("conv_bn_relu"), summary.fused("conv_bn_relu")) == (2, 2)
    assert (summary.total("conv_bn_add"), summary.fused("conv_bn_add")) == (1, 1)
    assert summary.int8_layer_share == 0.0
    # The shape call is no compute; the Move kgen is a reformat.
    assert (summary.compute_layers, summary.reformat_layers, summary.weighted_layers) == (7, 1, 6)


def test_int8_plan_reports_correlation_plus_kgen_epilogue_not_fusion(block_analysis: FusionAnalysis) -> None:
    result = verify_fusions(block_analysis, LayerReport(RTX_INT8, "builder_log"), backend="tensorrt-rtx")
    assert all(e.status == "epilogue" and not e.fused and e.precision == "int8" for e in result.patterns)
    stem = _by_anchor(result, "stem_conv")
    # Named in three layers, counted once: the quantizer kgen before the conv is not part of the pattern.
    assert stem.layers == ("stem_conv_myl0_2", "__myl_MulAddReluMulMinMaxRounCast_myl0_3")
    assert stem.fused_as == "correlation + pointwise epilogue (1 kgen layer)"
    assert _by_anchor(result, "fc1").fused_as == "gemm + pointwise epilogue (1 kgen layer)"
    assert "BatchNormalization 'stem_bn', Relu 'stem_relu' ran in the pointwise layer" in stem.explanation
    assert "TensorRT-RTX builds every INT8 convolution this way" in stem.explanation
    summary = result.summary.to_dict()
    assert summary["conv_bn_relu_total"] == 2 and summary["conv_bn_relu_fused"] == 0
    assert summary["by_kind"]["conv_bn_add"] == {
        "total": 1, "fused": 0, "epilogue": 1, "separate": 0, "blocked": 0
    }  # fmt: skip
    assert summary["int8_weighted_layer_share"] == 1.0
    # 13 compute layers (the shape call excluded), of which the 4 correlation and 2 gemm layers are INT8.
    assert summary["int8_layer_share"] == pytest.approx(6 / 13)


def test_epilogue_explanation_mentions_tensorrt_rtx_only_for_that_backend(
    block_analysis: FusionAnalysis,
) -> None:
    result = verify_fusions(block_analysis, LayerReport(RTX_INT8, "engine_inspector"), backend="tensorrt")
    assert all("TensorRT-RTX" not in e.explanation and e.explanation for e in result.patterns)


def test_batchnorm_folded_before_the_build_counts_as_fused_and_says_so(
    block_analysis: FusionAnalysis,
) -> None:
    # The quantizer folds BatchNormalization into the conv weights before the build: no layer names it.
    folded = tuple(
        dataclasses.replace(layer, onnx_nodes=tuple(n for n in layer.onnx_nodes if "_bn" not in n))
        for layer in RTX_FP32
    )
    result = verify_fusions(block_analysis, LayerReport(folded, "builder_log"), backend="tensorrt-rtx")
    stem = _by_anchor(result, "stem_conv")
    assert stem.fused and stem.inferred
    assert "BatchNormalization 'stem_bn' named by no layer: taken as folded into it" in stem.fused_as
    assert result.summary.fused("conv_bn_relu") == 2


def test_an_activation_no_tensorrt_layer_names_is_not_assumed_fused(block_analysis: FusionAnalysis) -> None:
    layers = (_layer("__myl_CorrMulAdd_myl0_2", "runtime_fusion", "fp32", ("stem_conv", "stem_bn")),)
    result = verify_fusions(block_analysis, LayerReport(layers, "builder_log"), backend="tensorrt-rtx")
    stem = _by_anchor(result, "stem_conv")
    assert stem.status == "separate"
    assert "Named by no layer: Relu 'stem_relu'" in stem.explanation


def test_onnx_runtime_removing_fused_nodes_is_read_as_fusion(block_analysis: FusionAnalysis) -> None:
    layers = (_layer("stem_conv", "FusedConv", "fp32", ("stem_conv",)),)
    result = verify_fusions(block_analysis, LayerReport(layers, "optimized_graph"), backend="onnxruntime")
    stem = _by_anchor(result, "stem_conv")
    assert stem.fused and stem.inferred and stem.fused_as.startswith("FusedConv (")


def test_unfused_residual_add_lists_where_each_node_ran(block_analysis: FusionAnalysis) -> None:
    layers = (
        _layer("block_conv2", "Conv", "fp32", ("block_conv2", "block_bn2")),
        _layer("block_add", "Add", "fp32", ("block_add",)),
        _layer("block_relu2", "Relu", "fp32", ("block_relu2",)),
    )
    result = verify_fusions(block_analysis, LayerReport(layers, "optimized_graph"), backend="onnxruntime")
    block = _by_anchor(result, "block_conv2")
    assert block.status == "separate"
    assert block.fused_as == "separate layers: Conv 'block_conv2', Add 'block_add', Relu 'block_relu2'"
    assert (
        "Conv 'block_conv2' and BatchNormalization 'block_bn2' in Conv layer 'block_conv2'"
        in block.explanation
    )


def test_add_fused_into_the_other_branch_is_explained(block_analysis: FusionAnalysis) -> None:
    layers = (
        _layer("a", "runtime_fusion", "fp32", ("block_conv2", "block_bn2")),
        _layer("b", "runtime_fusion", "fp32", ("other_conv", "block_add", "block_relu2")),
    )
    block = _by_anchor(
        verify_fusions(block_analysis, LayerReport(layers, "builder_log"), backend="tensorrt-rtx"),
        "block_conv2",
    )
    assert not block.fused
    assert (
        "Add 'block_add' and Relu 'block_relu2' in runtime_fusion layer 'b' together with other_conv"
        in block.explanation
    )


def test_an_opaque_myelin_layer_makes_the_fusion_unverifiable(block_analysis: FusionAnalysis) -> None:
    everything = tuple(node for pattern in block_analysis.patterns for node in pattern.nodes)
    layers = (_layer("{ForeignNode[stem_conv...fc2]}", "Myelin", "fp32", everything),)
    result = verify_fusions(block_analysis, LayerReport(layers, "engine_inspector"), backend="tensorrt")
    assert {e.status for e in result.patterns} == {"unverifiable"}
    assert "opaque Myelin layer" in result.patterns[0].explanation
    assert result.summary.fused("conv_bn_relu") == 0


def test_a_report_of_another_model_leaves_every_pattern_missing(block_analysis: FusionAnalysis) -> None:
    layers = (_layer("conv_0", "CaskConvolution", "int8", ("conv_0",), ("int8",)),)
    result = verify_fusions(block_analysis, LayerReport(layers, "engine_inspector"), backend="tensorrt")
    assert {e.status for e in result.patterns} == {"missing"}
    assert "does not belong to this model" in result.patterns[0].explanation


def test_a_blocked_pattern_that_did_not_fuse_says_it_was_not_expected_to() -> None:
    blocked = FusionPattern(
        kind="conv_act",
        nodes=("conv", "leaky"),
        op_types=("Conv", "LeakyRelu"),
        activation="LeakyRelu",
        int8_fusable=False,
        blockers=("activation LeakyRelu ('leaky') is not one TensorRT documents fusing into convolutions",),
    )
    layers = (
        _layer("conv", "correlation", "int8", ("conv",), ("int8",)),
        _layer("__myl_MulAddMulMax_myl0_1", "kgen", "fp32", ("conv", "leaky")),
    )
    result = verify_fusions(
        FusionAnalysis((blocked,), True), LayerReport(layers, "builder_log"), backend="tensorrt-rtx"
    )
    assert result.patterns[0].status == "epilogue"
    assert "Not expected to fuse in INT8 anyway: activation LeakyRelu" in result.patterns[0].explanation


def test_verification_to_dict_is_json_ready(block_analysis: FusionAnalysis) -> None:
    result = verify_fusions(block_analysis, LayerReport(RTX_INT8, "builder_log"), backend="tensorrt-rtx")
    data = json.loads(json.dumps(result.to_dict()))
    assert (data["backend"], data["source"]) == ("tensorrt-rtx", "builder_log")
    first = data["patterns"][0]
    assert first["nodes"] == ["stem_conv", "stem_bn", "stem_relu"] and first["fused"] is False
    assert first["layers"] == ["stem_conv_myl0_2", "__myl_MulAddReluMulMinMaxRounCast_myl0_3"]
    assert set(data["summary"]) >= {
        "conv_bn_relu_total", "conv_bn_relu_fused", "conv_bn_add_total", "conv_bn_add_fused",
        "by_kind", "int8_layer_share", "reformat_layers",
    }  # fmt: skip


# --- real ONNX Runtime optimized graphs -----------------------------------------------------------------


def _ort_optimized(model_path: Path, level: ort.GraphOptimizationLevel, out: Path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


@pytest.mark.parametrize(
    ("level", "add_fused"),
    [
        # NCHWc convolutions absorb the residual Sum and its Relu.
        (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, 16),
        # FusedConv takes Conv+BN+Relu but leaves Sum and Relu of a residual block as separate nodes.
        (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, 0),
    ],
    ids=["enable_all", "enable_extended"],
)
def test_onnx_runtime_fusions_of_the_zoo_resnet50(
    zoo_model_path: Callable[[str], Path], tmp_path: Path, level: ort.GraphOptimizationLevel, add_fused: int
) -> None:
    path = zoo_model_path("resnet50")
    original = onnx.load(str(path))
    optimized = _ort_optimized(path, level, tmp_path / "optimized.onnx")
    report = layer_report_from_optimized_graph(optimized, original)
    result = verify_fusions(analyze_fusions(original), report, backend="onnxruntime")
    summary = result.summary
    assert (summary.total("conv_bn_relu"), summary.fused("conv_bn_relu")) == (33, 33)
    assert (summary.total("conv_bn_add"), summary.fused("conv_bn_add")) == (16, add_fused)
    assert summary.fused("conv_bn") == 4
    assert summary.int8_layer_share == 0.0
    if add_fused == 0:
        unfused = result.patterns[
            next(i for i, e in enumerate(result.patterns) if e.pattern.kind == "conv_bn_add")
        ]
        assert unfused.status == "separate" and "Sum 'n14'" in unfused.explanation


# --- a real TensorRT-RTX build through the backend -----------------------------------------------------


@pytest.fixture(scope="module")
def rtx_resnet50_fp32(resnet50_bytes: bytes) -> BuiltEngine:
    """One real ahead-of-time FP32 build of the zoo's ResNet-50 (1-3 s, ~300 MB) for this module."""
    from service.backends.tensorrt_rtx import TensorRtRtxBackend

    backend = TensorRtRtxBackend()
    availability = backend.available()
    if not availability.can_build:
        pytest.skip(f"TensorRT-RTX cannot build here: {availability.reason}")
    return backend.build(resnet50_bytes, BuildSpec(precision="fp32"))


def test_tensorrt_rtx_fp32_build_fuses_all_33_conv_bn_relu_and_16_conv_bn_add(
    rtx_resnet50_fp32: BuiltEngine, resnet50_bytes: bytes
) -> None:
    analysis = analyze_fusions(onnx.load_from_string(resnet50_bytes))
    result = verify_fusions(analysis, rtx_resnet50_fp32.layer_report, backend="tensorrt-rtx")
    summary = result.summary.to_dict()
    assert (summary["conv_bn_relu_total"], summary["conv_bn_relu_fused"]) == (33, 33)
    assert (summary["conv_bn_add_total"], summary["conv_bn_add_fused"]) == (16, 16)
    assert summary["by_kind"]["conv_bn"] == {
        "total": 4,
        "fused": 4,
        "epilogue": 0,
        "separate": 0,
        "blocked": 0,
    }
    # Every pattern is one runtime_fusion layer named after all its nodes: nothing inferred.
    assert {(e.fused_as, e.precision, e.inferred) for e in result.patterns} == {
        ("runtime_fusion", "fp32", False)
    }
    assert summary["int8_layer_share"] == 0.0


def _silu_and_hardswish_analysis() -> FusionAnalysis:
    from tests.onnx_graph.test_fusions import Net

    net = Net()
    c1 = net.conv("x", "conv1")
    silu = net.node("Mul", [c1, net.node("Sigmoid", [c1], "sigmoid")], "silu_mul")
    c2 = net.conv(silu, "conv2")
    hswish = net.node("Mul", [net.node("HardSigmoid", [c2], "hsig", alpha=1 / 6, beta=0.5), c2], "hswish_mul")
    return analyze_fusions(net.model(hswish))


def test_silu_and_hardswish_read_the_same_in_the_static_and_the_engine_report() -> None:
    analysis = _silu_and_hardswish_analysis()
    # Static: not blocked; the INT8 convolution runs, the activation as its pointwise epilogue.
    assert [(p.activation, p.expected) for p in analysis.patterns] == [
        ("SiLU", "epilogue"),
        ("HardSwish", "epilogue"),
    ]
    assert analysis.summary.blocked == 0
    # A TensorRT-RTX INT8 plan: correlation + kgen per convolution, as its Layers: dump shows.
    int8 = (
        _layer("conv1_myl0_1", "correlation", "int8", ("conv1",), ("int8",)),
        _layer("__myl_MulSigMul_myl0_2", "kgen", "fp32", ("conv1", "sigmoid", "silu_mul")),
        _layer("conv2_myl0_3", "correlation", "int8", ("conv2",), ("int8",)),
        _layer("__myl_HsigMul_myl0_4", "kgen", "fp32", ("conv2", "hsig", "hswish_mul")),
    )
    engine = verify_fusions(analysis, LayerReport(int8, "builder_log"), backend="tensorrt-rtx")
    assert [(p.status, p.pattern.expected) for p in engine.patterns] == [("epilogue", "epilogue")] * 2
    by_kind = engine.to_dict()["summary"]["by_kind"]["conv_act"]
    assert by_kind == {"total": 2, "fused": 0, "epilogue": 2, "separate": 0, "blocked": 0}
    assert "activation SiLU" in engine.patterns[0].explanation
    # The same model in FP32: one runtime_fusion layer each, fused.
    fp32 = (
        _layer("__myl_CorrSigMul_myl0_1", "runtime_fusion", "fp32", ("conv1", "sigmoid", "silu_mul")),
        _layer("__myl_CorrHsigMul_myl0_2", "runtime_fusion", "fp32", ("conv2", "hsig", "hswish_mul")),
    )
    fused = verify_fusions(analysis, LayerReport(fp32, "builder_log"), backend="tensorrt-rtx")
    assert {p.status for p in fused.patterns} == {"fused"}


def test_a_pattern_the_graph_blocks_is_reported_blocked_with_the_static_reason() -> None:
    from tests.onnx_graph.test_fusions import _bn_output_is_graph_output

    analysis = analyze_fusions(_bn_output_is_graph_output())
    (pattern,) = [p for p in analysis.patterns if p.anchor == "conv"]
    assert pattern.expected == "blocked" and "consumers" in pattern.reason
    layers = (
        _layer("conv", "CaskConvolution", "int8", ("conv", "bn"), ("int8",)),
        _layer("relu", "Activation", "int8", ("relu",), ("int8",)),
    )
    result = verify_fusions(analysis, LayerReport(layers, "engine_inspector"), backend="tensorrt")
    (entry,) = [e for e in result.patterns if e.pattern.anchor == "conv"]
    assert entry.status == "blocked"
    assert entry.explanation.startswith(f"Blocked: {pattern.reason}")
    data = entry.to_dict()
    assert (data["status"], data["expected"], data["reason"]) == ("blocked", "blocked", pattern.reason)
    assert result.to_dict()["summary"]["by_kind"][pattern.kind]["blocked"] == 1
