"""Evaluation pieces: the FP32 reference of an engine, Q/DQ pair removal, per-layer deltas, the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.backends.registry import get_backend
from service.errors import BadInput
from service.reports.benchmark import MeasuredEngine
from service.reports.evaluation import (
    NO_LAYERS_TENSORRT,
    EvaluationData,
    EvaluationReport,
    evaluate_engine,
    evaluation_batch_size,
    model_without_qdq_pairs,
    reference_model_for,
    usable_samples,
)
from service.reports.layer_deltas import layer_deltas, shared_tensors
from service.serving.runner_pool import RunnerPool
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.serving.engines import Stores, build_engine, open_stores

SCALE = 0.05


def with_qdq(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy where every consumer of each named tensor reads it through QuantizeLinear->DequantizeLinear.

    stem_relu_out -> Q(int8, scale 0.05) -> DQ -> (its former consumers)
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(SCALE, np.float32), "qdq_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "qdq_zero"),
        ]
    )
    nodes = list(graph.node)
    for tensor in tensors:
        q = helper.make_node(
            "QuantizeLinear", [tensor, "qdq_scale", "qdq_zero"], [f"{tensor}_q"], name=f"{tensor}_Q"
        )
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{tensor}_q", "qdq_scale", "qdq_zero"],
            [f"{tensor}_dq"],
            name=f"{tensor}_DQ",
        )
        for node in nodes:
            for index, name in enumerate(node.input):
                if name == tensor:
                    node.input[index] = f"{tensor}_dq"
        position = next((i for i, n in enumerate(nodes) if f"{tensor}_dq" in n.input), len(nodes))
        nodes[position:position] = [q, dq]
    del graph.node[:]
    graph.node.extend(nodes)
    return result


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": x})[0])


def _x(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_removing_qdq_pairs_gives_back_the_float_model_exactly() -> None:
    fp32 = resnet_block_classifier(seed=41)
    qdq = with_qdq(fp32, ["input", "stem_relu_out", "block_relu1_out"])
    assert not np.allclose(_run(qdq, _x()), _run(fp32, _x()), atol=1e-6)
    stripped = model_without_qdq_pairs(qdq)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in stripped.graph.node)
    onnx.checker.check_model(stripped)
    np.testing.assert_array_equal(_run(stripped, _x()), _run(fp32, _x()))
    assert len(qdq.graph.node) == len(fp32.graph.node) + 6  # the input model is left as it was


def test_a_dequantized_graph_output_keeps_its_name_and_int8_weights_keep_their_dequantizer() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w_int8", "s", "z"], ["w"], name="w_DQ"),
            helper.make_node("Mul", ["x", "w"], ["y"], name="mul"),
            helper.make_node("QuantizeLinear", ["y", "s", "z"], ["y_q"], name="y_Q"),
            helper.make_node("DequantizeLinear", ["y_q", "s", "z"], ["out"], name="y_DQ"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
        [
            numpy_helper.from_array(np.array([3, -2], np.int8), "w_int8"),
            numpy_helper.from_array(np.array(0.5, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "z"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    stripped = model_without_qdq_pairs(model)
    assert [n.op_type for n in stripped.graph.node] == ["DequantizeLinear", "Mul", "Identity"]
    session = onnxruntime.InferenceSession(model_bytes(stripped), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["out"], {"x": np.array([0.3, 0.3], np.float32)})[0], [0.45, -0.3])


def test_the_reference_is_the_fp32_model_its_parent_or_the_stripped_upload(tmp_path: Path) -> None:
    stores = open_stores(tmp_path)
    fp32 = resnet_block_classifier(seed=42)
    plain = build_engine(stores, fp32)
    assert reference_model_for(plain, stores.models).description == "the FP32 model the engine was built from"

    qdq = with_qdq(fp32, ["input", "stem_relu_out"])
    uploaded = build_engine(stores, qdq, precision="int8")
    reference = reference_model_for(uploaded, stores.models)
    assert reference.model_id == uploaded.model_id
    assert "every QuantizeLinear->DequantizeLinear pair removed" in reference.description
    np.testing.assert_array_equal(_run(reference.model, _x()), _run(fp32, _x()))

    parent_id = stores.models.add_model(model_bytes(fp32), "fp32.onnx", source="upload")[0].id
    child = with_qdq(fp32, ["block_relu1_out"])
    child_id = stores.models.add_model(
        model_bytes(child), "q.onnx", source="quantization", parent_id=parent_id
    )[0].id
    derived = build_engine(stores, child, precision="int8", model_id=child_id)
    reference = reference_model_for(derived, stores.models)
    assert reference.model_id == parent_id and "was quantized from" in reference.description


def test_layer_deltas_find_where_quantization_error_enters() -> None:
    fp32 = resnet_block_classifier(seed=43)
    qdq = with_qdq(fp32, ["block_relu1_out"])
    batches = [{"input": _x(2, seed)} for seed in range(3)]
    deltas = layer_deltas(fp32, qdq, batches, worst=3)
    assert deltas.available and deltas.samples == 6
    assert deltas.compared_tensors == len(shared_tensors(fp32, qdq))
    assert deltas.worst[0].tensor in {
        "block_conv2_out",
        "block_bn2_out",
        "block_add_out",
        "block_relu2_out",
    }
    untouched = {d.tensor: d for d in layer_deltas(fp32, qdq, batches, worst=100).worst}
    assert untouched["stem_conv_out"].snr_db == 300.0 and untouched["stem_conv_out"].max_abs_error == 0.0
    assert untouched["block_conv2_out"].snr_db < 60 and untouched["block_conv2_out"].cosine < 1.0


def test_batch_size_follows_a_fixed_batch_or_the_profile() -> None:
    from service.backends.base import IOSpec, ShapeRange

    assert evaluation_batch_size([IOSpec("x", "float32", (4, 3))]) == (4, False)
    assert evaluation_batch_size([IOSpec("x", "float32", ("N", 3))]) == (8, True)
    profiled = IOSpec("x", "float32", ("N", 3), ShapeRange((2, 3), (2, 3), (4, 3)))
    assert evaluation_batch_size([profiled]) == (4, False)
    assert usable_samples(10, 4, False) == 8 and usable_samples(10, 4, True) == 10
    with pytest.raises(BadInput, match="fewer than one batch of 4"):
        usable_samples(3, 4, False)


@pytest.fixture
def stores(tmp_path: Path) -> Stores:
    return open_stores(tmp_path)


def test_an_engine_evaluation_compares_outputs_and_reads_back_from_json(stores: Stores) -> None:
    fp32 = resnet_block_classifier(seed=44)
    record = build_engine(stores, fp32)
    samples = _x(20, seed=9)
    data = EvaluationData(
        "set",
        20,
        lambda batch, stop: ({"input": samples[i : min(i + batch, stop)]} for i in range(0, stop, batch)),
    )
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    measured = MeasuredEngine.from_record(record, get_backend("onnxruntime").describe())
    with pool.lease(record.id) as runner:
        reference = reference_model_for(record, stores.models)
        built = stores.models.load(record.built_model_id)
        report = evaluate_engine(runner, measured, reference, data, max_samples=12, built_model=built)
        without_layers = evaluate_engine(runner, measured, reference, data)
    assert report.samples == 12 and report.batch_size == 8
    (logits,) = report.accuracy["outputs"]
    assert logits["cosine"] == pytest.approx(1.0) and logits["top1_agreement"] == 1.0
    assert report.layers.available and report.layers.samples == 12
    assert without_layers.samples == 20
    assert without_layers.layers.available is False
    assert without_layers.layers.note == NO_LAYERS_TENSORRT.format(backend="onnxruntime")
    assert EvaluationReport.from_dict(report.to_dict()).to_dict() == report.to_dict()
