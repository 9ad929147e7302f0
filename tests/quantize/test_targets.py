"""The placement strategies: each resolves from its target name, unknown names are a BadInput, and the
entry points that take a name give exactly what the strategy they resolve to gives."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import onnx
import pytest

from service.backends.cpu_isa import host_int8_weight_max
from service.errors import BadInput
from service.quantize.ort_qdq import OnnxRuntimePlacement
from service.quantize.pipeline import QuantizationOutcome
from service.quantize.qdq import TensorRtPlacement
from service.quantize.targets import (
    placement_for,
    placement_summary,
    qdq_model_from_scales,
    tensors_to_calibrate,
)
from tests.quantize import graphs


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def test_the_tensorrt_target_resolves_to_the_simulated_int8_placement() -> None:
    placement = placement_for("tensorrt", ort_weight_max=64)
    assert isinstance(placement, TensorRtPlacement)
    assert placement.name == "tensorrt"
    assert placement.simulates_qdq, "TensorRT's INT8 kernels cannot run here: Q/DQ is simulated in float"
    assert placement.weight_max == 127, "the ONNX Runtime weight range does not apply to TensorRT"


def test_the_onnxruntime_target_resolves_to_its_integer_kernel_placement() -> None:
    placement = placement_for("onnxruntime", ort_weight_max=64)
    assert isinstance(placement, OnnxRuntimePlacement)
    assert placement.name == "onnxruntime"
    assert not placement.simulates_qdq, "ONNX Runtime's own integer kernels run the model"
    assert placement.weight_max == 64
    assert placement_for("onnxruntime").weight_max == host_int8_weight_max()


@pytest.mark.parametrize(
    "call",
    [
        lambda model: placement_for("openvino"),
        lambda model: tensors_to_calibrate(model, target="openvino"),
        lambda model: placement_summary(model, target="openvino"),
        lambda model: qdq_model_from_scales(model, {}, target="openvino"),
    ],
    ids=["placement_for", "tensors_to_calibrate", "placement_summary", "qdq_model_from_scales"],
)
def test_an_unknown_target_is_a_bad_input_naming_the_known_ones(
    call: Callable[[onnx.ModelProto], object],
) -> None:
    with pytest.raises(
        BadInput, match="unknown Q/DQ placement target 'openvino'; use one of tensorrt, onnxruntime"
    ):
        call(graphs.two_conv_residual())


def test_activation_params_follow_each_targets_encoding() -> None:
    scale, zero = placement_for("tensorrt").activation_params("t", 12.7, non_negative=True)
    # amax / 127, rounded up to a value FP16 represents exactly; symmetric int8 whatever the sign.
    assert 0.1 <= scale == pytest.approx(0.1, rel=1e-3) and float(np.float16(scale)) == scale
    assert zero.dtype == np.int8 and int(zero) == 0

    ort = placement_for("onnxruntime")
    scale, zero = ort.activation_params("t", 25.5, non_negative=True)
    assert scale == pytest.approx(0.1) and zero.dtype == np.uint8 and int(zero) == 0, "[0, amax] on 255 steps"
    scale, zero = ort.activation_params("t", 12.7, non_negative=False)
    assert scale == pytest.approx(0.1) and zero.dtype == np.uint8 and int(zero) == 128, "symmetric around 128"


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_the_name_taking_entry_points_give_what_the_strategy_gives(target: str) -> None:
    model = graphs.two_conv_residual()
    placement = placement_for(target, ort_weight_max=127)
    summary = placement.summary(model)
    assert list(summary.tensors_to_calibrate) == tensors_to_calibrate(model, target=target)  # type: ignore[arg-type]
    assert summary.target == target and [layer.node for layer in summary.quantized] == ["conv_a", "conv_b"]

    amax = {tensor: 1.0 + i for i, tensor in enumerate(summary.tensors_to_calibrate)}
    direct = placement.qdq_model(model, amax)
    named = qdq_model_from_scales(model, amax, target=target, ort_weight_max=127)  # type: ignore[arg-type]
    assert _digest(direct.model) == _digest(named.model)
    assert direct.quantized_nodes == named.quantized_nodes == ("conv_a", "conv_b")


def test_only_the_onnxruntime_placement_treats_relu_outputs_as_non_negative() -> None:
    model = graphs.two_conv_residual()
    trt, ort = placement_for("tensorrt"), placement_for("onnxruntime")
    assert trt.non_negative_tensors(trt.prepared(model)) == frozenset()
    assert "out" not in ort.non_negative_tensors(ort.prepared(model)), "a graph output is never quantized"
    assert ort.non_negative_tensors(ort.prepared(model)) <= set(ort.summary(model).tensors_to_calibrate)


@pytest.mark.parametrize(("target", "simulated"), [("tensorrt", True), ("onnxruntime", False)])
def test_a_quantization_outcome_says_whether_its_accuracy_was_simulated(target: str, simulated: bool) -> None:
    outcome = QuantizationOutcome(
        qdq_model=onnx.ModelProto(),
        method="max",
        activation_amax={},
        calibration_cache=b"",
        accuracy=None,
        placement=placement_for(target),
    )
    assert outcome.qdq_simulated is simulated
