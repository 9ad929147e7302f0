"""Q/DQ insertion: numerics in ONNX Runtime, the INT8 encoding, and bad amax input."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.errors import BadInput
from service.quantize.bn_fold import fold_batchnorm
from service.quantize.qdq import activation_scale, fp16_exact_scales, quantize_weight
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.model_factory import resnet_block_classifier, two_input_adder
from tests.quantize import graphs
from tests.quantize.support import (
    amax_by_running,
    cosine,
    initializer,
    node,
    producers,
    run,
    weight_dequantize,
)


def _calibrated(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
    return amax_by_running(model, tensors_to_calibrate(model), batches)


@pytest.mark.parametrize("opset", [9, 13, 17, 21])
def test_quantized_classifier_tracks_fp32_on_random_inputs(opset: int) -> None:
    model = fold_batchnorm(resnet_block_classifier(opset=opset))
    rng = np.random.default_rng(opset)
    batches = [{"input": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(2)]

    result = qdq_model_from_scales(model, _calibrated(model, batches))

    onnx.checker.check_model(result.model, full_check=True)
    for feeds in batches:
        assert cosine(run(model, feeds)[0], run(result.model, feeds)[0]) > 0.99
    assert result.per_channel_weights == 6


def test_result_lists_quantized_tensors_and_layers() -> None:
    model = resnet_block_classifier()
    amax = dict.fromkeys(tensors_to_calibrate(model), 2.0)

    result = qdq_model_from_scales(model, amax)

    assert list(result.activation_tensors) == tensors_to_calibrate(model)
    quantize_nodes = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(q.input[0] for q in quantize_nodes) == sorted(result.activation_tensors)


def test_activation_scale_is_amax_over_127_with_int8_zero_point() -> None:
    model = resnet_block_classifier()
    amax = dict.fromkeys(tensors_to_calibrate(model), 2.0) | {"stem_relu_out": 5.08}

    qdq = qdq_model_from_scales(model, amax).model
    q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "stem_relu_out")

    scale = float(initializer(qdq, q.input[1]))
    assert scale == pytest.approx(5.08 / 127, rel=1e-3) and scale >= 5.08 / 127
    zero = initializer(qdq, q.input[2])
    assert zero.dtype == np.int8 and zero == 0


def test_weights_are_stored_as_int8_and_dequantize_to_the_originals() -> None:
    model = resnet_block_classifier()
    qdq = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 1.0)).model
    dq = weight_dequantize(qdq, node(qdq, "stem_conv").input[1])
    assert dq is not None

    values, scales = initializer(qdq, dq.input[0]), initializer(qdq, dq.input[1])
    original = initializer(model, "stem_conv.weight")
    assert values.dtype == np.int8 and np.abs(values).max() == 127
    assert scales.shape == (original.shape[0],)
    restored = values.astype(np.float32) * scales.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(restored - original) <= scales.reshape(-1, 1, 1, 1) / 2 + 1e-7)
    assert "stem_conv.weight" not in {t.name for t in qdq.graph.initializer}  # float copy dropped


def test_bias_stays_float_and_outside_any_dequantize() -> None:
    model = resnet_block_classifier()
    qdq = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 1.0)).model

    for name in ("stem_conv", "fc1", "fc2"):
        bias = node(qdq, name).input[2]
        assert bias not in producers(qdq)
        assert initializer(qdq, bias).dtype == np.float32


def test_missing_amax_is_rejected_naming_the_tensors() -> None:
    model = resnet_block_classifier()
    amax = dict.fromkeys(tensors_to_calibrate(model), 1.0)
    del amax["block_relu1_out"], amax["input"]

    with pytest.raises(
        BadInput, match=r"no activation amax for 2 tensor\(s\).*'input', 'block_relu1_out'"
    ) as caught:
        qdq_model_from_scales(model, amax)
    assert caught.value.details["missing_tensors"] == ["input", "block_relu1_out"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_non_finite_or_negative_amax_is_rejected(bad: float) -> None:
    model = two_input_adder()

    with pytest.raises(BadInput, match=r"finite and >= 0.*'image'"):
        qdq_model_from_scales(model, {"image": bad})


def test_zero_amax_gets_scale_one_instead_of_dividing_by_zero() -> None:
    model = two_input_adder()
    qdq = qdq_model_from_scales(model, {"image": 0.0}).model
    feeds = {"image": np.zeros((1, 3, 8, 8), np.float32), "bias_map": np.ones((1, 4, 8, 8), np.float32)}

    q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear")
    assert float(initializer(qdq, q.input[1])) == 1.0
    np.testing.assert_allclose(run(qdq, feeds)[0], run(model, feeds)[0], rtol=1e-2, atol=1e-2)


def test_extra_amax_entries_are_ignored() -> None:
    model = two_input_adder()

    result = qdq_model_from_scales(model, {"image": 3.0, "not_a_tensor": 1.0})

    assert result.activation_tensors == ("image",)


def test_layouts_quantize_and_run_close_to_fp32() -> None:
    rng = np.random.default_rng(7)
    cases = [
        (graphs.mlp_weight_layouts(), {"x": rng.standard_normal((4, 6)).astype(np.float32)}),
        (graphs.two_conv_residual(), {"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}),
        (graphs.deconv_sigmoid_head(), {"x": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)}),
    ]
    for model, feeds in cases:
        result = qdq_model_from_scales(model, _calibrated(model, [feeds]))
        onnx.checker.check_model(result.model, full_check=True)
        for expected, got in zip(run(model, feeds), run(result.model, feeds), strict=True):
            assert cosine(expected, got) > 0.99


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.float32, (3, 2, 2), elements=st.floats(-50, 50, width=32)),
    st.sampled_from([None, 0, 2]),
)
def test_quantize_weight_error_stays_within_half_a_step(weight: np.ndarray, axis: int | None) -> None:
    values, scales = quantize_weight(weight, axis)

    shape = [-1 if a == axis else 1 for a in range(3)] if axis is not None else []
    step = scales.reshape(shape).astype(np.float64)
    assert values.dtype == np.int8 and np.abs(values.astype(np.int32)).max() <= 127
    assert np.all(np.abs(values * step - weight) <= step / 2 + 1e-6)
    assert np.all(fp16_exact_scales(scales) == scales)


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e6))
def test_activation_scale_covers_amax_and_is_fp16_exact(amax: float) -> None:
    scale = activation_scale(amax)

    assert scale > 0
    assert np.float32(scale) == np.float32(np.float16(scale))
    if amax > 0:
        assert amax / scale <= 127 * (1 + 1e-6)
        assert scale <= amax / 127 * (1 + 2**-10) + 2**-24  # one FP16 ulp, absolute below 2**-14
