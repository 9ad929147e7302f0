"""Detector heads: tensors of different magnitude never share one INT8 scale (both placements).

The graph, a two-branch head joined as YOLO exports join box and score branches:

    input -> Conv big (x100 range) --\
                                      Concat -> Conv pick (reads only the small branch) -> x1 -> output
    input -> Conv small -------------/
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.quantize.canonical import canonical_model
from service.quantize.ort_placement import plan_ort_qdq
from service.quantize.ort_prepare import onnxruntime_prepared
from service.quantize.placement import plan_qdq
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.quantize.support import amax_by_running, run


def _two_branch_head() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    big = (rng.standard_normal((4, 3, 3, 3)) * 100).astype(np.float32)
    small = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    pick = np.zeros((2, 8, 1, 1), dtype=np.float32)
    pick[0, 4:, 0, 0], pick[1, 4:, 0, 0] = 1.0, -1.0  # only the small branch reaches the output
    nodes = [
        helper.make_node("Conv", ["input", "w_big"], ["big"], name="conv_big", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["input", "w_small"], ["small"], name="conv_small", pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["big", "small"], ["joined"], name="join", axis=1),
        helper.make_node("Conv", ["joined", "w_pick"], ["picked"], name="conv_pick"),
        helper.make_node("Mul", ["picked", "one"], ["output"], name="scale_out"),
    ]
    graph = helper.make_graph(
        nodes,
        "two_branch_head",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 16, 16])],
        [
            numpy_helper.from_array(v, n)
            for n, v in (("w_big", big), ("w_small", small), ("w_pick", pick), ("one", np.float32(1.0)))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def test_a_concat_of_ranges_far_apart_stays_float_and_each_input_keeps_its_scale() -> None:
    model = _two_branch_head()
    data = np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)
    batches = [{"input": data[i : i + 4]} for i in range(0, 16, 4)]
    amax = amax_by_running(model, tensors_to_calibrate(model, target="onnxruntime"), batches)
    assert amax["big"] > 8 * amax["small"]

    prepared = onnxruntime_prepared(model)
    assert "join" in plan_ort_qdq(prepared).integer_ops  # without ranges: the widest plan
    ranged = plan_ort_qdq(prepared, ranges=amax)
    assert "join" not in ranged.integer_ops
    assert {t.tensor for t in ranged.tensors} >= {"big", "small"}  # each quantized with its own range
    (kept,) = ranged.kept
    assert kept.node == "conv_pick" and "ranges differ" in kept.reason  # its one input scale would lose

    result = qdq_model_from_scales(model, amax, target="onnxruntime", ort_weight_max=64)
    (expected,) = run(model, {"input": data})
    (got,) = run(result.model, {"input": data})
    cosine = float(np.dot(expected.ravel(), got.ravel()) / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.99, cosine

    # The same join with one shared scale: the small branch drowns in the large one's steps.
    joined_amax = {**amax, "small": amax["big"]}
    shared = qdq_model_from_scales(model, joined_amax, target="onnxruntime", ort_weight_max=64)
    (lost,) = run(shared.model, {"input": data})
    lost_cosine = float(
        np.dot(expected.ravel(), lost.ravel()) / np.linalg.norm(expected) / np.linalg.norm(lost)
    )
    assert lost_cosine < cosine - 0.05


def test_the_tensorrt_placement_keeps_a_layer_reading_a_mixed_join_in_float() -> None:
    model = _two_branch_head()
    data = np.random.default_rng(1).standard_normal((16, 3, 16, 16)).astype(np.float32)
    batches = [{"input": data[i : i + 4]} for i in range(0, 16, 4)]
    needed = tensors_to_calibrate(model, target="tensorrt")
    assert {"big", "small"} <= set(needed)  # the join's inputs are collected for the judgement
    amax = amax_by_running(model, needed, batches)

    canonical = canonical_model(model, min_opset=13)
    assert "conv_pick" in plan_qdq(canonical).quantized_nodes  # without ranges: the widest plan
    ranged = plan_qdq(canonical, ranges=amax)
    (kept,) = ranged.kept
    assert kept.node == "conv_pick" and "ranges differ" in kept.reason
    assert "joined" not in ranged.tensors  # no one-scale Q/DQ on the join

    result = qdq_model_from_scales(model, amax, target="tensorrt")
    assert "conv_pick" in result.kept_nodes and "conv_big" in result.quantized_nodes
    (expected,) = run(model, {"input": data})
    (got,) = run(result.model, {"input": data})
    cosine = float(np.dot(expected.ravel(), got.ravel()) / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cosine > 0.999, cosine
