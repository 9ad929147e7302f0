"""FP16 typing: types, FP32 boundaries, kept ops, Q/DQ hybrids, ONNX Runtime numerics, and TensorRT-RTX."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from service.errors import BadInput
from service.quantize.bn_fold import fold_batchnorm
from service.quantize.fp16 import DEFAULT_KEEP_FP32_OPS, fp16_model_from
from service.quantize.rewrite import int_attr
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.model_factory import resnet_block_classifier, two_input_adder
from tests.quantize import graphs
from tests.quantize.support import amax_by_running, cosine, initializer, node, producers, rapidocr_model, run


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


def _calibrated_qdq(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    amax = amax_by_running(model, tensors_to_calibrate(model), batches)
    return qdq_model_from_scales(model, amax).model


@pytest.fixture(scope="module")
def classifier_batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"input": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(2)]


@pytest.mark.parametrize("opset", [9, 13, 17, 21])
def test_fp32_classifier_becomes_fp16_inside_with_fp32_io(opset: int, classifier_batches: list) -> None:
    model = resnet_block_classifier(opset=opset, softmax=True)

    typed = fp16_model_from(model)

    onnx.checker.check_model(typed, full_check=True)
    assert typed.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert typed.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    types = _types(typed)
    assert types[node(typed, "block_conv1").output[0]] == TensorProto.FLOAT16
    assert types[node(typed, "fc1").input[1]] == TensorProto.FLOAT16
    softmax = node(typed, "softmax")
    assert types[softmax.input[0]] == TensorProto.FLOAT  # kept FP32 by default
    for feeds in classifier_batches:
        expected, got = run(model, feeds)[0], run(typed, feeds)[0]
        np.testing.assert_allclose(got, expected, atol=2e-3)


def test_softmax_output_reaches_the_graph_output_without_an_fp16_round_trip() -> None:
    typed = fp16_model_from(resnet_block_classifier(softmax=True))
    made_by = producers(typed)

    last = made_by["logits"]
    assert last.op_type == "Identity"
    assert made_by[last.input[0]].op_type == "Softmax"


def test_graph_inputs_get_one_cast_for_their_fp16_readers() -> None:
    typed = fp16_model_from(two_input_adder())
    casts = [n for n in typed.graph.node if n.op_type == "Cast" and n.input[0] in ("image", "bias_map")]

    assert sorted(c.input[0] for c in casts) == ["bias_map", "image"]
    assert all(c.attribute[0].i == TensorProto.FLOAT16 for c in casts)


def test_kept_ops_and_nodes_stay_fp32() -> None:
    model = resnet_block_classifier()

    typed = fp16_model_from(model, keep_fp32_ops={"Gemm"}, keep_fp32_nodes={"head_conv"})

    types = _types(typed)
    assert types[node(typed, "fc2").output[0]] == TensorProto.FLOAT
    assert initializer(typed, "fc2.weight").dtype == np.float32
    assert types[node(typed, "head_conv").output[0]] == TensorProto.FLOAT
    assert types[node(typed, "block_conv1").output[0]] == TensorProto.FLOAT16
    assert "Softmax" in DEFAULT_KEEP_FP32_OPS and "LayerNormalization" in DEFAULT_KEEP_FP32_OPS


def test_unknown_kept_node_is_rejected() -> None:
    with pytest.raises(BadInput, match="keep_fp32_nodes names nodes the model does not have: 'fc3'"):
        fp16_model_from(resnet_block_classifier(), keep_fp32_nodes={"fc3"})


def test_already_fp16_model_is_rejected() -> None:
    typed = fp16_model_from(resnet_block_classifier(), keep_fp32_ops=())

    with pytest.raises(BadInput, match="cannot type the model FP16"):
        fp16_model_from(typed)


def test_qdq_classifier_becomes_an_int8_fp16_hybrid(classifier_batches: list) -> None:
    model = fold_batchnorm(resnet_block_classifier())
    qdq = _calibrated_qdq(model, classifier_batches)

    hybrid = fp16_model_from(qdq)

    onnx.checker.check_model(hybrid, full_check=True)
    assert max(o.version for o in hybrid.opset_import if o.domain in ("", "ai.onnx")) >= 19
    types = _types(hybrid)
    for dq in (n for n in hybrid.graph.node if n.op_type == "DequantizeLinear"):
        assert types[dq.input[1]] == TensorProto.FLOAT16
        assert types[dq.output[0]] == TensorProto.FLOAT16  # DQ output type is its scale type
        assert types[dq.input[0]] == TensorProto.INT8
    conv = node(hybrid, "block_conv1")
    assert producers(hybrid)[conv.input[0]].op_type == "DequantizeLinear"  # no Cast inside the pattern
    for feeds in classifier_batches:
        assert cosine(run(qdq, feeds)[0], run(hybrid, feeds)[0]) > 0.999
        assert cosine(run(model, feeds)[0], run(hybrid, feeds)[0]) > 0.99


def test_qdq_can_keep_fp32_scales_with_casts_around_them(classifier_batches: list) -> None:
    qdq = _calibrated_qdq(resnet_block_classifier(), classifier_batches)

    typed = fp16_model_from(qdq, keep_fp32_ops=DEFAULT_KEEP_FP32_OPS | {"QuantizeLinear", "DequantizeLinear"})

    onnx.checker.check_model(typed, full_check=True)
    assert (
        max(o.version for o in typed.opset_import if o.domain in ("", "ai.onnx")) == 17
    )  # no upgrade needed
    types = _types(typed)
    conv = node(typed, "block_conv1")
    assert types[conv.input[0]] == TensorProto.FLOAT16
    assert producers(typed)[conv.input[0]].op_type == "Cast"
    assert all(
        types[n.output[0]] == TensorProto.FLOAT for n in typed.graph.node if n.op_type == "DequantizeLinear"
    )
    for feeds in classifier_batches:
        assert cosine(run(qdq, feeds)[0], run(typed, feeds)[0]) > 0.999


def test_scales_fp16_cannot_hold_are_rounded_up_and_weights_requantized(classifier_batches: list) -> None:
    model = resnet_block_classifier()
    qdq = _calibrated_qdq(model, classifier_batches)
    # A Q/DQ model made elsewhere: nudge one weight scale off the FP16 grid.
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith("stem_conv"))
    scale_init = next(t for t in qdq.graph.initializer if t.name == dq.input[1])
    odd = (initializer(qdq, dq.input[1]).astype(np.float64) * 1.0003).astype(np.float32)
    scale_init.CopyFrom(onnx.numpy_helper.from_array(odd, scale_init.name))
    weights_before = initializer(qdq, dq.input[0]).astype(np.float64) * odd.reshape(-1, 1, 1, 1)

    hybrid = fp16_model_from(qdq)

    dq16 = node(hybrid, dq.name)
    scale16 = initializer(hybrid, dq16.input[1]).astype(np.float64)
    assert np.all(scale16 >= odd)
    weights_after = initializer(hybrid, dq16.input[0]).astype(np.float64) * scale16.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(weights_after - weights_before) <= scale16.reshape(-1, 1, 1, 1) / 2 + 1e-9)


def test_detector_types_fp16_and_stays_close_in_onnxruntime() -> None:
    from tests.quantize.support import photo_batches

    detector = onnx.load(rapidocr_model("PP-OCRv6_det_small.onnx"))
    batches = photo_batches((128, 128), 2)

    typed = fp16_model_from(detector)

    onnx.checker.check_model(typed, full_check=True)
    types = _types(typed)
    resize = next(n for n in typed.graph.node if n.op_type == "Resize")
    assert types[resize.output[0]] == TensorProto.FLOAT  # Resize stays FP32: its scales must be float32
    for feeds in batches:
        assert cosine(run(detector, feeds)[0], run(typed, feeds)[0]) > 0.9999


# ---- TensorRT-RTX: builds ahead of time on this CPU-only machine ---------------------------------


def _tensorrt_rtx_layers(model: onnx.ModelProto, batch: int = 1) -> str:
    """Build a strongly typed TensorRT-RTX engine and return the builder's per-layer dump."""
    trt = pytest.importorskip("tensorrt_rtx")
    messages: list[str] = []

    class _Capture(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: object, msg: str) -> None:
            messages.append(msg)

    logger = _Capture()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [
        str(parser.get_error(i)) for i in range(parser.num_errors)
    ]
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = [batch if d < 0 else d for d in tensor.shape]
        profile.set_shape(tensor.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None, messages[-5:]
    return next(m for m in messages if m.startswith("Layers:"))


def test_tensorrt_rtx_builds_the_hybrid_with_int8_and_fp16_layers(classifier_batches: list) -> None:
    model = fold_batchnorm(resnet_block_classifier())
    hybrid = fp16_model_from(_calibrated_qdq(model, classifier_batches))

    layers = _tensorrt_rtx_layers(hybrid)

    convs = [line for line in layers.splitlines() if "LayerType: correlation" in line]
    assert len(convs) == 4 and all("Datatype: Int8" in line for line in convs)
    gemms = [line for line in layers.splitlines() if "LayerType: gemm" in line]
    assert gemms and all("Datatype: Half" in line for line in gemms)
    assert "[ONNX Layer: block_add]" in layers  # the residual Add fused into the INT8 conv's epilogue


def test_tensorrt_rtx_builds_the_fp16_typed_fp32_model() -> None:
    typed = fp16_model_from(resnet_block_classifier(softmax=True))

    layers = _tensorrt_rtx_layers(typed)

    fused = [line for line in layers.splitlines() if "runtime_fusion" in line]
    assert fused and all("Datatype: Half" in line for line in fused)
    assert "Datatype: Int8" not in layers


@pytest.mark.parametrize(
    ("build", "shapes"),
    [
        (graphs.deconv_sigmoid_head, {"x": (2, 4, 8, 8)}),
        (graphs.mlp_weight_layouts, {"x": (3, 6)}),
        (graphs.transformer_residual, {"x": (2, 5, 8)}),
        (graphs.batchnorm_cases, {"x": (2, 4, 6, 6), "gamma": (4,)}),
    ],
)
@pytest.mark.parametrize("quantized", [False, True])
def test_every_test_graph_types_fp16_with_fp32_outputs(
    build: Callable[[], onnx.ModelProto], shapes: dict[str, tuple[int, ...]], quantized: bool
) -> None:
    rng = np.random.default_rng(9)
    feeds = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    model = build()
    if quantized:
        model = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 3.0)).model

    typed = fp16_model_from(model)

    onnx.checker.check_model(typed, full_check=True)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in typed.graph.output)
    for expected, got in zip(run(model, feeds), run(typed, feeds), strict=True):
        assert cosine(expected, got) > 0.999


@pytest.mark.parametrize("quantized", [False, True])
def test_a_yolov8_style_export_with_float_casts_types_fp16(quantized: bool) -> None:
    # Exporters write Cast(to=FLOAT) nodes; typing retargets them to FLOAT16, which the converter's own
    # "already converted" check used to take for an FP16 model ("The model is already converted...").
    model = graphs.yolov8_style_head()
    if quantized:
        model = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 4.0)).model
    feeds = {"x": np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)}

    typed = fp16_model_from(model)

    onnx.checker.check_model(typed, full_check=True)
    casts = {n.name: n for n in typed.graph.node if n.op_type == "Cast"}
    assert int_attr(casts["stem_cast"], "to", 0) == TensorProto.FLOAT16
    expected, got = run(model, feeds)[0], run(typed, feeds)[0]
    assert got.dtype == np.float32
    assert cosine(expected[:, :4], got[:, :4]) > 0.999  # boxes
    assert cosine(expected[:, 4:], got[:, 4:]) > 0.999  # class scores


def test_a_model_with_an_fp16_cast_is_refused_with_its_name() -> None:
    model = graphs.yolov8_style_head()
    next(n for n in model.graph.node if n.name == "stem_cast").attribute[0].i = TensorProto.FLOAT16

    with pytest.raises(BadInput, match="already holds FP16 \\(Cast node 'stem_cast'\\)"):
        fp16_model_from(model)
