"""The ONNX Runtime placement: Q/DQ that ORT's CPU provider really runs as integer kernels.

Every check builds the Q/DQ model into a real ONNX Runtime engine with the service's backend and reads
the optimized graph it saved: QLinearConv, QGemm, QLinearMatMul... are what ORT runs, not what we hope.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from service.accuracy.outputs import evaluate_with_onnxruntime
from service.backends.base import BuildSpec, BuiltEngine
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.builds.pipeline import layer_counts, placement_target
from service.errors import BadInput
from service.quantize.ort_placement import plan_ort_qdq
from service.quantize.ort_prepare import onnxruntime_prepared
from service.quantize.pipeline import QuantizationPlan, quantize_model
from service.quantize.qdq import QdqResult
from service.quantize.sensitivity import rank_layer_sensitivity
from service.quantize.targets import placement_for, qdq_model_from_scales, tensors_to_calibrate
from tests.data_factory import classifier_samples
from tests.model_factory import resnet_block_classifier
from tests.quantize import graphs
from tests.quantize.support import (
    amax_by_running,
    initializer,
    node,
    photo_batches,
    producers,
    rapidocr_model,
    session,
)

FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def _ort_int8(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> QdqResult:
    amax = amax_by_running(model, tensors_to_calibrate(model, target="onnxruntime"), batches)
    return qdq_model_from_scales(model, amax, target="onnxruntime")


def _engine(model: onnx.ModelProto) -> BuiltEngine:
    return OnnxRuntimeBackend().build(model.SerializeToString(), BuildSpec(precision="int8"))


def _ops(built: BuiltEngine) -> Counter[str]:
    return Counter(layer.type for layer in built.layer_report.layers)


def _random_feeds(model: onnx.ModelProto, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        i.name: rng.standard_normal(
            [d.dim_value if d.HasField("dim_value") else batch for d in i.type.tensor_type.shape.dim]
        ).astype(np.float32)
        for i in model.graph.input
    }


def _quantize_linear_for(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)


@pytest.fixture(scope="module")
def classifier() -> onnx.ModelProto:
    return resnet_block_classifier()


@pytest.fixture(scope="module")
def calibration() -> list[dict[str, np.ndarray]]:
    return [{"input": batch} for batch in np.split(classifier_samples(32), 4)]


@pytest.fixture(scope="module")
def classifier_int8(classifier: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> QdqResult:
    return _ort_int8(classifier, calibration)


def test_onnxruntime_target_runs_every_classifier_layer_as_an_integer_kernel(
    classifier_int8: QdqResult,
) -> None:
    built = _engine(classifier_int8.model)

    ops = _ops(built)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 2
    assert ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1  # the residual and the pooling too
    assert not FLOAT_COMPUTE_OPS & set(ops)
    counts = layer_counts(built.layer_report)
    assert counts["int8"] >= 8 and counts["fp32"] == 0


def test_tensorrt_target_leaves_onnxruntime_computing_in_float(
    classifier: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]
) -> None:
    # Why the second target exists: DequantizeLinear feeding float Conv/Gemm is FP32 work plus dequantizing.
    qdq = qdq_model_from_scales(
        classifier, amax_by_running(classifier, tensors_to_calibrate(classifier), calibration)
    )

    built = _engine(qdq.model)

    assert layer_counts(built.layer_report)["int8"] == 0
    assert {"FusedConv", "FusedGemm"} & set(_ops(built))


def test_onnxruntime_target_follows_fp32_on_held_out_samples(
    classifier: onnx.ModelProto, classifier_int8: QdqResult
) -> None:
    held_out = [{"input": classifier_samples(16, seed=5)}]

    report = evaluate_with_onnxruntime(classifier, classifier_int8.model, held_out)

    assert report.worst_cosine() > 0.999 and report.worst_snr_db() > 30.0
    # Random weights leave some logits near-tied; one flip in 16 is within the 0.001 cosine above.
    assert report.outputs[0].top1_agreement is not None and report.outputs[0].top1_agreement >= 0.9


def test_onnxruntime_target_calibrates_layer_outputs_named_as_in_the_uploaded_model(
    classifier: onnx.ModelProto,
) -> None:
    tensors = tensors_to_calibrate(classifier, target="onnxruntime")

    # Inputs of the layers, and the outputs their integer kernels requantize (after the folded Relu/Clip).
    assert tensors == [
        "input",
        "stem_relu_out",
        "block_relu1_out",
        "block_bn2_out",  # the Conv takes over its BatchNormalization's output name when BN is folded
        "block_relu2_out",
        "head_relu6_out",
        "pool_out",
        "flatten_out",  # Flatten reuses pool_out's scale; its own range serves plans that keep head_conv
        "fc1_relu_out",
    ]
    names = {out for n in classifier.graph.node for out in n.output} | {"input"}
    assert set(tensors) <= names


def test_outputs_behind_relu_and_clip_use_uint8_from_zero(classifier: onnx.ModelProto) -> None:
    amax = dict.fromkeys(tensors_to_calibrate(classifier, target="onnxruntime"), 4.0) | {
        "head_relu6_out": 7.0
    }

    qdq = qdq_model_from_scales(classifier, amax, target="onnxruntime").model

    relu_q = _quantize_linear_for(qdq, "stem_relu_out")
    assert initializer(qdq, relu_q.input[2]).dtype == np.uint8 and int(initializer(qdq, relu_q.input[2])) == 0
    assert float(initializer(qdq, relu_q.input[1])) == pytest.approx(4.0 / 255)
    clip_q = _quantize_linear_for(qdq, "head_relu6_out")
    clip_scale = np.float32(initializer(qdq, clip_q.input[1]))
    assert clip_scale * np.float32(255) <= 6.0  # ORT drops the Clip only when Q's range fits inside it
    assert clip_scale == pytest.approx(6.0 / 255)
    input_q = _quantize_linear_for(qdq, "input")  # sign unknown: symmetric around 128
    assert int(initializer(qdq, input_q.input[2])) == 128
    assert float(initializer(qdq, input_q.input[1])) == pytest.approx(4.0 / 127)


def test_data_movement_ops_share_scale_and_zero_point_with_their_input(classifier_int8: QdqResult) -> None:
    qdq = classifier_int8.model

    pooled, flattened = _quantize_linear_for(qdq, "pool_out"), _quantize_linear_for(qdq, "flatten_out")

    assert list(pooled.input[1:]) == list(flattened.input[1:])


def test_biases_are_int32_at_input_scale_times_weight_scale(classifier_int8: QdqResult) -> None:
    qdq = classifier_int8.model
    made_by = producers(qdq)
    conv = node(qdq, "stem_conv")
    bias_dq, weight_dq, input_dq = (made_by[conv.input[i]] for i in (2, 1, 0))

    input_scale = float(initializer(qdq, input_dq.input[1]))
    weight_scale = initializer(qdq, weight_dq.input[1])
    bias_values, bias_scale = initializer(qdq, bias_dq.input[0]), initializer(qdq, bias_dq.input[1])

    assert bias_values.dtype == np.int32 and weight_dq.input[0] in {t.name for t in qdq.graph.initializer}
    np.testing.assert_allclose(bias_scale, np.float32(input_scale) * weight_scale, rtol=1e-6)
    folded_bias = initializer(onnxruntime_prepared(resnet_block_classifier()), "stem_conv.folded_bias")
    np.testing.assert_allclose(bias_values * bias_scale, folded_bias, atol=float(bias_scale.max()))


def test_bias_adds_identities_and_pooling_join_the_integer_region() -> None:
    model = graphs.pooled_matmul_head()
    feeds = _random_feeds(model)
    result = _ort_int8(model, [feeds])

    ops = _ops(_engine(result.model))

    assert ops["QLinearConv"] == 1  # the per-channel Add became its bias, the Identity is gone
    assert ops["QLinearMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 1  # fc2 writes the float output
    assert not FLOAT_COMPUTE_OPS & set(ops)
    pool = next(layer for layer in _engine(result.model).layer_report.layers if "pool" in layer.onnx_nodes)
    assert pool.precision == "int8"  # MaxPool runs on the uint8 tensor directly
    expected, got = session(model).run(None, feeds)[0], session(result.model).run(None, feeds)[0]
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.999


def test_layers_without_an_integer_form_stay_float_and_say_why() -> None:
    model = graphs.batchnorm_cases()
    amax = dict.fromkeys(tensors_to_calibrate(model, target="onnxruntime"), 2.0)

    result = qdq_model_from_scales(model, amax, target="onnxruntime")

    assert result.quantized_nodes == ("dyn",)
    reasons = {kept.node: kept.reason for kept in plan_ort_qdq(onnxruntime_prepared(model)).kept}
    assert set(result.kept_nodes) == set(reasons) == {"ct", "plain", "shared"}
    assert "no integer kernel" in reasons["ct"]  # ConvTranspose
    assert "graph output" in reasons["plain"]  # QLinearConv cannot write a float graph output


def test_unknown_placement_target_is_a_bad_input(classifier: onnx.ModelProto) -> None:
    with pytest.raises(BadInput, match="unknown Q/DQ placement target 'openvino'"):
        tensors_to_calibrate(classifier, target="openvino")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("backend", "target"),
    [("onnxruntime", "onnxruntime"), ("tensorrt-rtx", "tensorrt"), ("tensorrt", "tensorrt")],
)
def test_builds_place_qdq_for_the_backend_that_runs_the_engine(backend: str, target: str) -> None:
    assert placement_target(backend) == target


def test_quantize_model_with_the_onnxruntime_target_reports_its_accuracy(
    classifier: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]
) -> None:
    held_out = [{"input": classifier_samples(16, seed=5)}]

    outcome = quantize_model(
        classifier,
        lambda: iter(calibration),
        32,
        lambda: iter(held_out),
        QuantizationPlan(target="onnxruntime"),
    )

    assert set(outcome.activation_amax) == set(tensors_to_calibrate(classifier, target="onnxruntime"))
    assert outcome.accuracy is not None and outcome.accuracy.worst_cosine() > 0.999
    assert _ops(_engine(outcome.qdq_model))["QLinearConv"] == 4


def test_sensitivity_ranks_the_layers_of_the_onnxruntime_placement(
    classifier: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]
) -> None:
    amax = amax_by_running(classifier, tensors_to_calibrate(classifier, target="onnxruntime"), calibration)

    ranking = rank_layer_sensitivity(
        classifier, amax, lambda: iter(calibration[:1]), placement=placement_for("onnxruntime")
    )

    assert {entry.node for entry in ranking} == {
        "stem_conv",
        "block_conv1",
        "block_conv2",
        "head_conv",
        "fc1",
        "fc2",
    }


def test_ppocr_detector_runs_every_conv_in_int8_and_keeps_its_text_map() -> None:
    detector = onnx.load(rapidocr_model("PP-OCRv6_det_small.onnx"))
    result = _ort_int8(detector, photo_batches((192, 192), 4))

    built = _engine(result.model)

    ops = _ops(built)
    convs = sum(n.op_type == "Conv" for n in detector.graph.node)
    assert ops["QLinearConv"] == convs == 83  # each Conv's bias Add folded, each output requantized in int8
    assert ops["ConvTranspose"] == 2  # no integer ConvTranspose on ORT's CPU provider
    assert layer_counts(built.layer_report)["int8"] > convs
    text = photo_batches((192, 192), 1, start=4)[0]  # held out: the text photo
    expected, got = session(detector).run(None, text)[0], session(result.model).run(None, text)[0]
    assert np.dot(expected.ravel(), got.ravel()) / np.linalg.norm(expected) / np.linalg.norm(got) > 0.98
    assert ((expected > 0.3) == (got > 0.3)).mean() > 0.97
