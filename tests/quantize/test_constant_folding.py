"""Weights computed from constants are folded and quantized; a model with nothing to quantize is refused."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from service.backends.base import BuildSpec
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.errors import BadInput
from service.quantize.canonical import canonical_model
from service.quantize.pipeline import QuantizationPlan, quantize_model
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.model_factory import resnet_block_classifier
from tests.quantize import graphs
from tests.quantize.support import initializer, node, run

LIGHT_RESNET50 = "light_resnet50"


def _zoo_model(name: str) -> onnx.ModelProto:
    import onnx.backend.test

    return onnx.load(f"{onnx.backend.test.__path__[0]}/data/light/{name}.onnx")


def _batches(model: onnx.ModelProto, count: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    value = model.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else 2 for d in value.type.tensor_type.shape.dim]
    return [{value.name: rng.random(shape, dtype=np.float32)} for _ in range(count)]


def test_canonical_form_turns_computed_weights_into_initializers() -> None:
    model = graphs.computed_weight_conv()

    canonical = canonical_model(model)

    assert [n.op_type for n in canonical.graph.node] == ["Conv", "Relu", "GlobalAveragePool"]
    conv = node(canonical, "conv")
    expected = initializer(model, "w_values").reshape(4, 3, 3, 3)
    np.testing.assert_array_equal(initializer(canonical, conv.input[1]), expected)
    np.testing.assert_array_equal(initializer(canonical, conv.input[2]), np.full(4, 0.1, np.float32))
    assert conv.input[1] == "w_reshape_out"  # folded tensors keep their names
    assert not {"w_count", "w_values", "b_count"} & {t.name for t in canonical.graph.initializer}
    feeds = _batches(model, 1)[0]
    np.testing.assert_array_equal(run(canonical, feeds)[0], run(model, feeds)[0])


def test_canonical_form_leaves_the_input_model_untouched() -> None:
    model = graphs.computed_weight_conv()
    before = model.SerializeToString()

    canonical_model(model)

    assert model.SerializeToString() == before


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_computed_weights_quantize_like_stored_ones(target: str) -> None:
    model = graphs.computed_weight_conv()
    amax = dict.fromkeys(tensors_to_calibrate(model, target=target), 3.0)  # type: ignore[arg-type]

    result = qdq_model_from_scales(model, amax, target=target)  # type: ignore[arg-type]

    assert result.quantized_nodes == ("conv",) and result.per_channel_weights == 1


def test_light_resnet50_quantizes_every_conv_for_both_targets() -> None:
    model = _zoo_model(LIGHT_RESNET50)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)

    trt = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 4.0))
    ort_tensors = tensors_to_calibrate(model, target="onnxruntime")
    ort = qdq_model_from_scales(model, dict.fromkeys(ort_tensors, 4.0), target="onnxruntime")

    assert len(trt.quantized_nodes) == trt.per_channel_weights == convs == 53
    assert [node(model, name).op_type for name in trt.kept_nodes] == ["Gemm"]  # the softmax head
    built = OnnxRuntimeBackend().build(ort.model.SerializeToString(), BuildSpec(precision="int8"))
    ops = Counter(layer.type for layer in built.layer_report.layers)
    assert ops["QLinearConv"] == convs
    assert not {"Conv", "FusedConv"} & set(ops)


def test_quantize_ops_on_constant_weights_are_not_folded_away() -> None:
    # DequantizeLinear(int8 constant) is how an explicitly quantized model states its weights.
    model = graphs.computed_weight_conv()
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_int8"),
            numpy_helper.from_array(np.array(0.01, np.float32), "w_scale_dq"),
        ]
    )
    graph.node.insert(
        0, helper.make_node("DequantizeLinear", ["w_int8", "w_scale_dq"], ["w_dq"], name="w_dq")
    )
    node(model, "conv").input[1] = "w_dq"

    assert "DequantizeLinear" in {n.op_type for n in canonical_model(model).graph.node}
    with pytest.raises(BadInput, match="already contains DequantizeLinear"):
        tensors_to_calibrate(model)


def test_a_model_without_constant_weights_is_refused_instead_of_returned_unquantized() -> None:
    model = graphs.runtime_weight_conv()
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32), "w": np.ones((4, 3, 3, 3), np.float32)}

    with pytest.raises(
        BadInput, match="nothing in this model can be quantized to INT8: the model has no Conv"
    ):
        quantize_model(model, lambda: iter([feeds]), 1, None, QuantizationPlan())


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_skipping_every_weighted_layer_is_refused_naming_the_layers(target: str) -> None:
    model = resnet_block_classifier()
    feeds = {"input": np.ones((1, 3, 16, 16), np.float32)}
    plan = QuantizationPlan(skip=("Conv", "Gemm"), target=target)  # type: ignore[arg-type]

    with pytest.raises(BadInput, match=r"every weighted layer stays in float .*stem_conv \(skip\)"):
        quantize_model(model, lambda: iter([feeds]), 1, None, plan)
