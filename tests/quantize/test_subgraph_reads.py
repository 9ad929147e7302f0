"""Quantize rules on graphs whose If bodies read outer tensors: what a body reads is never folded away.

Topology (the If bodies read ``conv_out`` and the weight ``w`` from the outer scope)::

    x -> Conv(w) -> conv_out -> BatchNormalization -> Relu -> y
                        \\-> [If body: Neg(conv_out)] -> z
    w -> [If body: Identity(w)] -> w_copy
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.quantize.bn_fold import batchnorm_folding
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.quantize.support import run

SHAPE = [1, 3, 8, 8]


def _body(name: str, node: onnx.NodeProto, output: str, shape: list[int]) -> onnx.GraphProto:
    return helper.make_graph(
        [node], name, [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)]
    )


def _body_reader_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    channels = 4
    weight = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w")
    params = [
        numpy_helper.from_array(value.astype(np.float32), name)
        for name, value in (
            ("gamma", rng.uniform(0.5, 1.5, channels)),
            ("beta", rng.standard_normal(channels)),
            ("mean", rng.standard_normal(channels)),
            ("var", rng.uniform(0.5, 1.5, channels)),
        )
    ]
    cond = numpy_helper.from_array(np.array(True), "cond")
    out_shape = [1, channels, 8, 8]
    negate = _body(
        "negate", helper.make_node("Neg", ["conv_out"], ["negated"], name="body_neg"), "negated", out_shape
    )
    copy = _body(
        "copy",
        helper.make_node("Identity", ["w"], ["copied"], name="body_copy"),
        "copied",
        [channels, 3, 3, 3],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], ["bn_out"], name="bn"
        ),
        helper.make_node("Relu", ["bn_out"], ["y"], name="relu"),
        helper.make_node("If", ["cond"], ["z"], name="if_conv", then_branch=negate, else_branch=negate),
        helper.make_node("If", ["cond"], ["w_copy"], name="if_weight", then_branch=copy, else_branch=copy),
    ]
    graph = helper.make_graph(
        nodes,
        "body_reader",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, out_shape),
            helper.make_tensor_value_info("w_copy", TensorProto.FLOAT, [channels, 3, 3, 3]),
        ],
        [weight, *params, cond],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_batchnorm_is_not_folded_into_a_conv_whose_output_an_if_body_reads() -> None:
    model = _body_reader_model()
    result = batchnorm_folding(model)

    assert not result.folded
    assert [(kept.batchnorm, kept.reason) for kept in result.kept] == [
        ("bn", "the output of 'conv' has other readers, which need the unnormalized values")
    ]
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for expected, got in zip(run(model, {"x": x}), run(result.model, {"x": x}), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_a_quantized_weight_an_if_body_also_reads_stays_in_the_model(target: str) -> None:
    model = _body_reader_model()
    tensors = tensors_to_calibrate(model, target=target)
    result = qdq_model_from_scales(model, dict.fromkeys(tensors, 4.0), target=target, ort_weight_max=127)

    assert result.quantized_nodes == ("conv",)
    assert "w" in {t.name for t in result.model.graph.initializer}, "the body still reads the float weight"
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    expected = dict(zip(["y", "z", "w_copy"], run(model, {"x": x}), strict=True))
    names = [o.name for o in result.model.graph.output]
    got = dict(zip(names, run(result.model, {"x": x}), strict=True))
    np.testing.assert_array_equal(got["w_copy"], expected["w_copy"])
    # The body negates the convolution's (now INT8) output: close to FP32, not equal.
    assert np.abs(got["z"] - expected["z"]).max() < 0.1 * np.abs(expected["z"]).max()
