"""Layer-report parsers on real captured TensorRT-RTX dumps, a documented-format inspector sample and
real ONNX Runtime optimized graphs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from service.backends.layer_report import (
    layer_report_from_builder_log,
    layer_report_from_inspector_json,
    layer_report_from_optimized_graph,
    normalize_dtype,
    onnx_nodes_from_metadata,
    precision_from_dtypes,
)
from service.errors import BuildFailed
from tests import model_factory
from tests.backends.qdq_models import hand_qdq_model

DATA = Path(__file__).parent / "data"
RESNET_BLOCK_NODES = tuple(node.name for node in model_factory.resnet_block_classifier().graph.node)


def _dump(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def _optimized(model: onnx.ModelProto, tmp_path: Path) -> onnx.ModelProto:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


# --- TensorRT-RTX builder dumps ----------------------------------------------------------------------


def test_fp32_dump_parses_every_layer_with_types_and_fused_nodes() -> None:
    report = layer_report_from_builder_log(_dump("rtx_fp32_resnet_block.txt"), RESNET_BLOCK_NODES)
    assert report.source == "builder_log"
    fusion, conv = "runtime_fusion", "correlation"
    kinds = [layer.type for layer in report.layers]
    assert kinds == ["kgen", fusion, fusion, fusion, conv, "kgen", "kgen", "kgen", "kgen"]
    first_fusion = report.layers[1]
    assert first_fusion.name == "__myl_CorrMulAddRelu_myl0_1"
    assert first_fusion.onnx_nodes == ("stem_conv", "stem_bn", "stem_relu")
    assert first_fusion.input_dtypes == ("fp32",) and first_fusion.output_dtypes == ("fp32",)
    assert report.layers_for_node("block_add")[0].onnx_nodes == (
        "block_conv2",
        "block_bn2",
        "block_add",
        "block_relu2",
    )
    assert report.unmapped_nodes == ("flatten",)
    assert report.precision_counts() == {"fp32": 9}


def test_layout_move_without_metadata_is_a_reformat_layer() -> None:
    report = layer_report_from_builder_log(_dump("rtx_fp32_resnet_block.txt"))
    move = report.layers[0]
    assert move.name == "__myl_Move_myl0_0"
    assert move.is_reformat and move.onnx_nodes == ()
    assert report.reformat_count == 1


def test_int8_dump_marks_correlation_layers_int8_and_quantizing_pointwise_fp32() -> None:
    report = layer_report_from_builder_log(_dump("rtx_int8_qdq_resnet_block.txt"))
    by_type = Counter((layer.type, layer.precision) for layer in report.layers)
    assert by_type[("correlation", "int8")] == 4
    assert by_type[("gemm", "int8")] == 2
    requantize = report.layers[2]
    assert requantize.type == "kgen"
    assert (requantize.input_dtypes, requantize.output_dtypes) == (("fp32",), ("int8",))
    assert requantize.precision == "fp32"  # computes in float, writes int8
    residual = next(layer for layer in report.layers if "block_add" in layer.onnx_nodes)
    assert residual.precision == "mixed" and set(residual.input_dtypes) == {"int8", "fp32"}
    # A Conv is named by the correlation layer and by the pointwise layers around it.
    assert {layer.type for layer in report.layers_for_node("stem_conv")} == {"correlation", "kgen"}


def test_fp16_dump_reports_half_precision_and_the_input_cast() -> None:
    report = layer_report_from_builder_log(_dump("rtx_fp16_resnet_block.txt"))
    assert report.precision_counts() == {"fp32": 1, "fp16": 8}
    cast = report.layers[0]
    assert cast.name == "__myl_CastConc_myl0_0" and cast.is_reformat
    assert cast.output_dtypes == ("fp16",)


def test_resnet50_excerpt_handles_sync_and_replicate_layers() -> None:
    report = layer_report_from_builder_log(_dump("rtx_fp32_resnet50_excerpt.txt"))
    assert len(report.layers) == 20
    signal = report.layers[0]
    assert (signal.type, signal.precision, signal.is_reformat, signal.onnx_nodes) == (
        "signal",
        "other",
        False,
        (),
    )
    replicate = next(layer for layer in report.layers if layer.name.startswith("__myl_Repl"))
    assert replicate.is_reformat and replicate.precision == "fp32"  # no inputs: precision from its output
    softmax = report.layers[-3]
    assert softmax.onnx_nodes == ("n174", "n175")


def test_a_log_without_a_layers_dump_gives_an_empty_report_listing_every_node_unmapped() -> None:
    report = layer_report_from_builder_log(["[I] Engine generation completed"], ("a", "b"))
    assert report.layers == () and report.unmapped_nodes == ("a", "b")


def test_only_the_last_layers_dump_counts_and_multiline_messages_are_split() -> None:
    first = (
        "Layers:\nName: old_myl0_0, LayerType: kgen, Inputs: [], Constants: [], Outputs: [], "
        "Metadata: [ONNX Layer: x]"
    )
    second = "\n".join(_dump("rtx_fp32_resnet_block.txt")[1:])
    report = layer_report_from_builder_log([first, "other message", second])
    assert len(report.layers) == 9 and "x" not in report.mapped_nodes()


# --- metadata, dtypes and the precision rule ------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "nodes"),
    [
        ("[ONNX Layer: conv1][ONNX Layer: bn1]", ("conv1", "bn1")),
        (
            "[ONNX Layer: /layer1/0/conv1/Conv]\x1e[ONNX Layer: /layer1/0/relu/Relu]",
            ("/layer1/0/conv1/Conv", "/layer1/0/relu/Relu"),
        ),
        ("[ONNX Layer: a]\x1f[ONNX Layer: b]\x1e[ONNX Layer: a]", ("a", "b")),
        ("[ONNX Layer: weird[0]]", ("weird[0]",)),
        ("", ()),
        ("some text without markers", ()),
    ],
    ids=[
        "concatenated",
        "record-separator",
        "unit-separator-and-repeat",
        "bracket-in-name",
        "empty",
        "no-marker",
    ],
)
def test_onnx_node_names_are_read_from_metadata(metadata: str, nodes: tuple[str, ...]) -> None:
    assert onnx_nodes_from_metadata(metadata) == nodes


@pytest.mark.parametrize(
    ("raw", "dtype"),
    [
        ("Float", "fp32"), ("Half", "fp16"), ("Int8", "int8"), ("BFloat16", "bf16"),
        ("Row major linear FP32", "fp32"), ("Channel major FP16 format where channel % 8 == 0", "fp16"),
        ("Thirty-two wide channel vectorized row major Int8 format.", "int8"),
        ("Row major linear Int32", "int32"), ("N/A due to dynamic shapes", "unknown"), ("uint8", "uint8"),
    ],
)  # fmt: skip
def test_datatype_and_format_strings_normalize_to_short_names(raw: str, dtype: str) -> None:
    assert normalize_dtype(raw) == dtype


@pytest.mark.parametrize(
    ("inputs", "outputs", "precision"),
    [
        (("int8",), ("fp32",), "int8"),
        (("fp32",), ("int8",), "fp32"),
        (("fp16", "int64"), ("fp16",), "fp16"),
        (("int8", "fp32"), ("int8",), "mixed"),
        ((), ("fp32",), "fp32"),
        ((), (), "other"),
        (("int64",), ("int64",), "other"),
        (("uint8",), ("uint8",), "int8"),
        (("bf16",), ("bf16",), "other"),
    ],
)
def test_precision_is_the_input_type_ignoring_index_types(
    inputs: tuple[str, ...], outputs: tuple[str, ...], precision: str
) -> None:
    assert precision_from_dtypes(inputs, outputs) == precision


# --- enterprise TensorRT inspector JSON ------------------------------------------------------------------


def test_inspector_json_sample_parses_types_metadata_and_reformats() -> None:
    report = layer_report_from_inspector_json(
        (DATA / "trt10_inspector_sample.json").read_text(), RESNET_BLOCK_NODES
    )
    assert report.source == "engine_inspector"
    names = [layer.name for layer in report.layers]
    assert names[1] == "stem_conv + stem_relu"
    reformat, stem, residual, head, flatten, fc1, fc2 = report.layers
    assert reformat.is_reformat and reformat.precision == "fp32" and reformat.output_dtypes == ("int8",)
    assert stem.precision == "int8" and stem.onnx_nodes == ("stem_conv", "stem_bn", "stem_relu")
    assert residual.onnx_nodes == ("block_conv2", "block_bn2", "block_add", "block_relu2")
    assert residual.input_dtypes == ("int8", "int8")
    assert head.precision == "fp16"
    assert flatten.is_reformat and flatten.input_dtypes == ("unknown",) and flatten.precision == "other"
    assert fc1.precision == "fp32"  # the Int32 index input is ignored
    assert fc2.precision == "fp16" and fc2.output_dtypes == ("fp32",)
    assert set(report.unmapped_nodes) == {"block_conv1", "block_bn1", "block_relu1", "pool"}


def test_inspector_layer_names_only_fall_back_to_node_names_from_the_layer_name() -> None:
    text = json.dumps(
        {"Layers": ["stem_conv + stem_relu", "Reformatting CopyNode for Output Tensor 0", "other"]}
    )
    report = layer_report_from_inspector_json(text, RESNET_BLOCK_NODES)
    assert report.layers[0].onnx_nodes == ("stem_conv", "stem_relu")
    assert report.layers[1].is_reformat
    assert report.layers[2].onnx_nodes == () and report.layers[2].type == "unknown"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),
        ('{"Layers": 3}', "no 'Layers' list"),
        ('{"Layers": [3]}', "Unexpected layer"),
    ],
)
def test_malformed_inspector_output_is_build_failed(text: str, message: str) -> None:
    with pytest.raises(BuildFailed, match=message):
        layer_report_from_inspector_json(text)


# --- ONNX Runtime optimized graphs --------------------------------------------------------------------------


def test_optimized_fp32_graph_traces_fused_nchwc_convs_back_to_conv_bn_relu(tmp_path: Path) -> None:
    original = model_factory.resnet_block_classifier()
    report = layer_report_from_optimized_graph(_optimized(original, tmp_path), original)
    assert report.source == "optimized_graph"
    fused = {layer.onnx_nodes for layer in report.layers if layer.type in ("Conv", "FusedConv")}
    assert ("stem_conv", "stem_bn", "stem_relu") in fused
    assert ("block_conv2", "block_bn2", "block_add", "block_relu2") in fused
    assert ("head_conv", "head_relu6") in fused
    gemm = next(layer for layer in report.layers if layer.type == "FusedGemm")
    assert gemm.onnx_nodes == ("fc1", "fc1_relu")
    layouts = [layer for layer in report.layers if layer.type == "ReorderOutput"]
    assert layouts and all(layer.is_reformat and layer.onnx_nodes == () for layer in layouts)
    assert report.unmapped_nodes == ()
    assert all(node in report.mapped_nodes() for node in RESNET_BLOCK_NODES)


def test_an_avx2_nchwc_chain_without_reorders_maps_to_the_same_groups() -> None:
    """ORT on AVX2 (NCHWc blocks of 8 = this model's channels) chains the convolutions with no
    ReorderOutput between them and renames every tensor between them; the groups must not bleed into
    each other. The optimized graph was saved by ONNX Runtime under qemu's Haswell (AVX2) model."""
    original = model_factory.resnet_block_classifier()
    optimized = onnx.load(str(DATA / "resnet_block_optimized_avx2.onnx"))
    assert not any(n.op_type == "ReorderOutput" for n in optimized.graph.node[:4])  # the AVX2 shape
    report = layer_report_from_optimized_graph(optimized, original)
    fused = {layer.onnx_nodes for layer in report.layers if layer.type in ("Conv", "FusedConv")}
    assert fused == {
        ("stem_conv", "stem_bn", "stem_relu"),
        ("block_conv1", "block_bn1", "block_relu1"),
        ("block_conv2", "block_bn2", "block_add", "block_relu2"),
        ("head_conv", "head_relu6"),
    }
    assert report.unmapped_nodes == ()


def test_optimized_qdq_graph_reports_int8_kernels_and_the_dequantize_nodes_they_absorbed(
    tmp_path: Path,
) -> None:
    from service.quantize.bn_fold import fold_batchnorm

    original = hand_qdq_model(fold_batchnorm(model_factory.resnet_block_classifier()))
    report = layer_report_from_optimized_graph(_optimized(original, tmp_path), original)
    qlinear = [layer for layer in report.layers if layer.type == "QLinearConv"]
    assert qlinear, "ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv"
    for layer in qlinear:
        assert layer.precision == "int8"
        convs = [node for node in layer.onnx_nodes if node.endswith("conv2")]
        assert convs, layer.onnx_nodes
        assert any(node.endswith("_DQ") for node in layer.onnx_nodes)  # the weight/activation DQ it swallowed
    quantizers = [layer for layer in report.layers if layer.type == "QuantizeLinear"]
    assert quantizers and all(
        layer.is_reformat and layer.output_dtypes[0] in ("int8", "uint8") for layer in quantizers
    )
    # A kept Q is itself: it absorbs nothing, even though ORT renamed its output tensor.
    assert all(layer.onnx_nodes == (layer.name,) for layer in quantizers)
    assert set(report.unmapped_nodes) | report.mapped_nodes() >= {node.name for node in original.graph.node}


def test_optimized_graph_without_the_original_names_only_kept_node_names(tmp_path: Path) -> None:
    original = model_factory.resnet_block_classifier()
    report = layer_report_from_optimized_graph(_optimized(original, tmp_path))
    assert next(layer for layer in report.layers if layer.type == "Gemm").onnx_nodes == ("fc2",)
    assert report.unmapped_nodes == ()
