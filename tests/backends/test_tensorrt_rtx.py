"""TensorRT-RTX: real ahead-of-time builds on this CPU-only host, and what their layer reports show."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxconverter_common import float16

from service.backends.base import Backend, BuildSpec, BuiltEngine, EngineLayer, ShapeRange
from service.backends.tensorrt_rtx import DEFAULT_TARGETS, TensorRtRtxBackend
from service.errors import BadInput, BuildFailed, InvalidModel
from tests import model_factory
from tests.backends.conftest import BuildCache, op_types
from tests.backends.qdq_models import activation_amax, hand_qdq_model

FP32 = BuildSpec(precision="fp32")


def _ops(layer: EngineLayer, types: dict[str, str]) -> Counter[str]:
    return Counter(types[node] for node in layer.onnx_nodes if node in types)


@pytest.fixture(scope="module")
def resnet_block_fp32(rtx_backend: Backend, builds: BuildCache, resnet_block: onnx.ModelProto) -> BuiltEngine:
    return builds.get(rtx_backend, "resnet_block_fp32", resnet_block, FP32)


@pytest.fixture(scope="module")
def resnet50() -> onnx.ModelProto:
    from tests.conftest import ONNX_ZOO_DIR

    return onnx.load(str(Path(ONNX_ZOO_DIR) / "light_resnet50.onnx"))


def test_describe_names_the_ahead_of_time_targets(rtx_backend: Backend) -> None:
    info = rtx_backend.describe()
    assert info.strongly_typed
    assert "no GPU on this host" in info.device
    assert info.compute_capability == ",".join(f"sm_{a}{b}" for a, b in DEFAULT_TARGETS)
    assert "sm_86" in info.device


def test_fp32_build_fuses_conv_bn_relu_into_runtime_fusion_layers(
    resnet_block_fp32: BuiltEngine, resnet_block: onnx.ModelProto
) -> None:
    types = op_types(resnet_block)
    fused = {
        frozenset(_ops(layer, types))
        for layer in resnet_block_fp32.layer_report.layers
        if layer.type == "runtime_fusion"
    }
    assert frozenset({"Conv", "BatchNormalization", "Relu"}) in fused
    assert frozenset({"Conv", "BatchNormalization", "Add", "Relu"}) in fused
    assert resnet_block_fp32.layer_report.unmapped_nodes == ("flatten",)  # a no-op reshape in the engine


def test_dynamic_batch_without_a_range_is_built_for_batch_one(resnet_block_fp32: BuiltEngine) -> None:
    assert "built for batch 1" in resnet_block_fp32.build_log
    assert (
        "MinShape: [1,3,16,16], OptShape: [1,3,16,16], MaxShape: [1,3,16,16]" in resnet_block_fp32.build_log
    )


def test_resnet50_fp32_fuses_every_conv_bn_relu_and_residual_block(
    rtx_backend: Backend, builds: BuildCache, resnet50: onnx.ModelProto
) -> None:
    built = builds.get(rtx_backend, "resnet50_fp32", resnet50, FP32)
    types = op_types(resnet50)
    fusions = Counter(
        tuple(sorted(_ops(layer, types)))
        for layer in built.layer_report.layers
        if layer.type == "runtime_fusion"
    )
    # ResNet-50: 33 Conv+BN+ReLU, 16 Conv+BN+residual Sum+ReLU, and 4 downsample Conv+BN shortcuts
    # (this caffe2 export writes the residual Add as Sum).
    assert fusions[("BatchNormalization", "Conv", "Relu")] == 33
    assert fusions[("BatchNormalization", "Conv", "Relu", "Sum")] == 16
    assert fusions[("BatchNormalization", "Conv")] == 4
    conv_count = sum(1 for op in types.values() if op == "Conv")
    assert conv_count == 53
    assert all(built.layer_report.layers_for_node(name) for name, op in types.items() if op == "Conv")


def test_fp16_typed_model_builds_fp16_layers(rtx_backend: Backend, builds: BuildCache) -> None:
    typed = float16.convert_float_to_float16(
        model_factory.resnet_block_classifier(batch=1), keep_io_types=True
    )
    built = builds.get(rtx_backend, "resnet_block_fp16", typed, BuildSpec(precision="fp16"))
    layers = built.layer_report.layers
    convs = [layer for layer in layers if layer.type in ("runtime_fusion", "correlation")]
    assert convs and all(layer.precision == "fp16" for layer in convs)
    casts = [layer for layer in layers if any(op == "Cast" for op in _ops(layer, op_types(typed)).elements())]
    assert casts, "the FP32->FP16 input cast appears in the report"


def test_qdq_model_builds_each_int8_conv_as_a_correlation_layer(
    rtx_backend: Backend, builds: BuildCache
) -> None:
    model = hand_qdq_model(model_factory.resnet_block_classifier(batch=1))
    built = builds.get(rtx_backend, "resnet_block_hand_qdq", model, BuildSpec(precision="int8"))
    types = op_types(model)
    convs = [name for name, op in types.items() if op == "Conv"]
    correlations = [layer for layer in built.layer_report.layers if layer.type == "correlation"]
    assert len(correlations) == len(convs) == 4
    assert all(layer.precision == "int8" and layer.input_dtypes == ("int8",) for layer in correlations)
    # Count fusions by layer type: a Conv is also named by the pointwise kgen layers around it.
    for conv in convs:
        holders = built.layer_report.layers_for_node(conv)
        assert sum(1 for layer in holders if layer.type == "correlation") == 1
        assert len(holders) >= 2
    gemms = [layer for layer in built.layer_report.layers if layer.type == "gemm"]
    assert len(gemms) == 2 and all(layer.precision == "int8" for layer in gemms)
    assert "has no INT8 layers" not in built.build_log


def test_service_quantizer_output_builds_as_an_int8_fp16_hybrid(
    rtx_backend: Backend, builds: BuildCache
) -> None:
    from service.quantize.bn_fold import fold_batchnorm
    from service.quantize.fp16 import fp16_model_from
    from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate

    fp32 = fold_batchnorm(model_factory.resnet_block_classifier(batch=1))
    sample = {"input": np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    amax = activation_amax(fp32, tensors_to_calibrate(fp32), sample)
    hybrid = fp16_model_from(qdq_model_from_scales(fp32, amax).model)
    built = builds.get(rtx_backend, "resnet_block_service_qdq_fp16", hybrid, BuildSpec(precision="int8"))
    counts = built.layer_report.precision_counts()
    assert counts["int8"] >= 6  # 4 convolutions and 2 GEMMs
    assert counts.get("fp16", 0) >= 1


def test_dynamic_batch_profile_is_built_as_requested(rtx_backend: Backend, builds: BuildCache) -> None:
    spec = BuildSpec(
        precision="fp32",
        shapes={
            "image": ShapeRange((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)),
            "bias_map": ShapeRange((1, 4, 8, 8), (4, 4, 8, 8), (8, 4, 8, 8)),
        },
    )
    built = builds.get(rtx_backend, "two_input_adder_dynamic", model_factory.two_input_adder(), spec)
    assert "MinShape: [1,3,8,8], OptShape: [4,3,8,8], MaxShape: [8,3,8,8]" in built.build_log
    assert "MinShape: [1,4,8,8], OptShape: [4,4,8,8], MaxShape: [8,4,8,8]" in built.build_log
    assert built.layer_report.layers_for_node("conv")


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"input": ShapeRange((1, 4, 16, 16), (1, 4, 16, 16), (1, 4, 16, 16))}, "axis 1 is fixed at 3"),
        ({"input": ShapeRange((1, 3, 16), (1, 3, 16), (1, 3, 16))}, "rank 4"),
        ({"input": ShapeRange((4, 3, 16, 16), (2, 3, 16, 16), (8, 3, 16, 16))}, "min <= opt <= max"),
        (
            {"image": ShapeRange((1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16))},
            r"not inputs of the model.*'input'",
        ),
    ],
    ids=["static-dim-mismatch", "wrong-rank", "unordered", "unknown-input"],
)
def test_shape_ranges_that_do_not_fit_the_model_are_bad_input(
    rtx_backend: Backend, resnet_block: onnx.ModelProto, shapes: dict[str, ShapeRange], message: str
) -> None:
    with pytest.raises(BadInput, match=message):
        rtx_backend.build(model_factory.model_bytes(resnet_block), BuildSpec(precision="fp32", shapes=shapes))


def test_dynamic_image_size_without_a_range_is_bad_input_naming_the_input(rtx_backend: Backend) -> None:
    model = model_factory.resnet_block_classifier()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    with pytest.raises(BadInput, match=r"Input 'input' has dynamic dimensions .*'H', 'W'.*\"shapes\""):
        rtx_backend.build(model_factory.model_bytes(model), FP32)


def test_explicit_target_architecture_is_built_and_reported(builds: BuildCache) -> None:
    backend = TensorRtRtxBackend(compute_capabilities=("sm_86",))
    assert backend.describe().compute_capability == "sm_86"
    assert "engines target sm_86" in backend.describe().device
    built = builds.get(backend, "two_input_adder_sm86", model_factory.two_input_adder(), FP32)
    assert built.layer_report.layers


def test_turing_target_refuses_fp32_gemm_with_the_builders_reason() -> None:
    backend = TensorRtRtxBackend(compute_capabilities=("7.5",))
    with pytest.raises(BuildFailed, match=r"Turing \(SM75\): FP32 GEMM is not supported"):
        backend.build(model_factory.model_bytes(model_factory.resnet_block_classifier(batch=1)), FP32)


@pytest.mark.parametrize("target", ["sm_90", "sm_61", "ampere"])
def test_targets_tensorrt_rtx_cannot_compile_for_are_bad_input(target: str) -> None:
    with pytest.raises(BadInput, match=r"sm_|compute capability"):
        TensorRtRtxBackend(compute_capabilities=(target,))


def test_int32_bias_behind_dequantize_is_rejected_by_the_parser_naming_the_node(rtx_backend: Backend) -> None:
    model = hand_qdq_model(model_factory.resnet_block_classifier(batch=1), int32_bias=True)
    with pytest.raises(InvalidModel, match=r"node 'stem_conv.bias_DQ' \(DequantizeLinear\).*Int32") as caught:
        rtx_backend.build(model_factory.model_bytes(model), BuildSpec(precision="int8"))
    assert caught.value.details["parser_errors"]


def test_ignored_requests_and_a_pointless_int8_request_are_said_in_the_build_log(
    resnet_block_fp32: BuiltEngine,
) -> None:
    assert "warning" not in resnet_block_fp32.build_log  # FP32 asked, FP32 built
    spec_notes = (
        TensorRtRtxBackend()
        .build(
            model_factory.model_bytes(model_factory.two_input_adder(size=4)),
            BuildSpec(precision="int8", keep_layers=("conv",), timing_cache_path="/nonexistent/timing.cache"),
        )
        .build_log
    )
    assert "has no INT8 layers" in spec_notes
    assert "keep_layers ['conv'] ignored" in spec_notes
    assert "timing_cache_path ignored" in spec_notes


def test_dimensions_named_question_mark_are_independent_for_the_parser(rapidocr_models_dir: Path) -> None:
    # PP-OCR's classifier declares x as [?, 3, ?, ?]: TensorRT would read H and W as one size.
    from service.backends.base import BuildSpec, ShapeRange
    from service.backends.registry import get_backend

    model = (rapidocr_models_dir / "ch_ppocr_mobile_v2.0_cls_mobile.onnx").read_bytes()
    shape = ShapeRange((1, 3, 48, 192), (1, 3, 48, 192), (1, 3, 48, 192))
    built = get_backend("tensorrt-rtx").build(model, BuildSpec(precision="fp32", shapes={"x": shape}))
    assert built.engine_bytes
    assert "made independent" in built.build_log and "x_dim2" in built.build_log
