"""One suite, every backend: the checks each backend must pass wherever it is available.

A backend that cannot build here is skipped with its own ``available().reason``; checks that need a
runnable engine are skipped with the reason too, and the complementary check (loading raises
EngineNotRunnableHere) runs instead. Builds are shared through the session ``builds`` cache.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.backends.base import Backend, BuildSpec, BuiltEngine, TimedRunner
from service.backends.registry import backend_names, get_backend
from service.errors import BuildFailed, EngineNotRunnableHere, InvalidModel
from tests import model_factory
from tests.backends.conftest import BuildCache, op_types, reference_outputs

FP32 = BuildSpec(precision="fp32")
# ONNX ops that compute nothing once shapes are known: a builder may fold them away entirely.
NO_COMPUTE_OPS = frozenset(
    {"Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Dropout", "Constant", "Shape"}
)
EXPECTED_SOURCE = {
    "onnxruntime": "optimized_graph",
    "tensorrt-rtx": "builder_log",
    "tensorrt": "engine_inspector",
}


@pytest.fixture(scope="module", params=backend_names())
def backend(request: pytest.FixtureRequest) -> Backend:
    backend = get_backend(request.param)
    availability = backend.available()
    if not availability.can_build:
        pytest.skip(f"{request.param}: {availability.reason}")
    return backend


@pytest.fixture(scope="module")
def fp32_engine(backend: Backend, builds: BuildCache, resnet_block: onnx.ModelProto) -> BuiltEngine:
    return builds.get(backend, "resnet_block_fp32", resnet_block, FP32)


def _skip_unless_runnable(backend: Backend) -> None:
    availability = backend.available()
    if not availability.can_run:
        pytest.skip(f"{backend.name} engines cannot run here: {availability.reason}")


def test_backend_describes_itself_with_version_and_device(backend: Backend) -> None:
    info = backend.describe()
    assert info.name == backend.name
    assert info.version and info.version[0].isdigit()
    assert info.device
    assert backend.describe() is info  # cached: describe() is called on every build request


def test_fp32_build_returns_engine_bytes_and_a_layer_report(
    backend: Backend, fp32_engine: BuiltEngine
) -> None:
    assert len(fp32_engine.engine_bytes) > 1000
    assert fp32_engine.info == backend.describe()
    assert fp32_engine.build_seconds > 0
    report = fp32_engine.layer_report
    assert report.source == EXPECTED_SOURCE[backend.name]
    assert report.layers
    assert report.precision_counts().get("fp32", 0) >= 5


def test_every_onnx_node_is_named_by_a_layer_or_reported_unmapped(
    fp32_engine: BuiltEngine, resnet_block: onnx.ModelProto
) -> None:
    types = op_types(resnet_block)
    report = fp32_engine.layer_report
    mapped = report.mapped_nodes()
    assert set(types) == (mapped & set(types)) | set(report.unmapped_nodes)
    assert not set(report.unmapped_nodes) & mapped
    assert {types[name] for name in report.unmapped_nodes} <= NO_COMPUTE_OPS
    for name, op in types.items():
        if op in ("Conv", "BatchNormalization", "Gemm", "Relu", "Add", "Clip", "GlobalAveragePool"):
            assert report.layers_for_node(name), f"compute node {name} ({op}) is in no layer"


def test_rebuilding_the_same_model_gives_byte_identical_engines(
    backend: Backend, fp32_engine: BuiltEngine, resnet_block: onnx.ModelProto
) -> None:
    again = backend.build(model_factory.model_bytes(resnet_block), FP32)
    assert hashlib.sha256(again.engine_bytes).digest() == hashlib.sha256(fp32_engine.engine_bytes).digest()


def test_engine_runs_and_matches_onnxruntime_fp32(
    backend: Backend, fp32_engine: BuiltEngine, resnet_block: onnx.ModelProto, image_batch
) -> None:
    _skip_unless_runnable(backend)
    batch = image_batch(1, 16)  # every backend's default profile includes batch 1
    expected = reference_outputs(resnet_block, {"input": batch})
    with backend.load(fp32_engine.engine_bytes) as runner:
        assert [spec.name for spec in runner.inputs] == ["input"]
        assert [spec.name for spec in runner.outputs] == ["logits"]
        assert runner.inputs[0].dtype == "float32"
        outputs = runner.infer({"input": batch})
    np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-3, atol=1e-4)


def test_runner_reports_stage_timings_that_add_up(
    backend: Backend, fp32_engine: BuiltEngine, image_batch
) -> None:
    _skip_unless_runnable(backend)
    with backend.load(fp32_engine.engine_bytes) as runner:
        assert isinstance(runner, TimedRunner)
        outputs, timings = runner.infer_timed({"input": image_batch(1, 16)})
    assert outputs["logits"].shape == (1, 10)
    assert min(timings.h2d_ms, timings.compute_ms, timings.d2h_ms) >= 0
    assert timings.total_ms == pytest.approx(timings.h2d_ms + timings.compute_ms + timings.d2h_ms)


def test_loading_where_engines_cannot_run_raises_engine_not_runnable(
    backend: Backend, fp32_engine: BuiltEngine
) -> None:
    availability = backend.available()
    if availability.can_run:
        pytest.skip(f"{backend.name} engines run here")
    with pytest.raises(EngineNotRunnableHere, match="cannot run"):
        backend.load(fp32_engine.engine_bytes)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"definitely not an onnx model", "not an ONNX model"),
        (
            model_factory.model_bytes(model_factory.two_input_adder())[:200],
            "not an ONNX model|truncated|no nodes",
        ),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_bytes_that_are_not_a_model_are_invalid_model(backend: Backend, data: bytes, message: str) -> None:
    with pytest.raises(InvalidModel, match=message):
        backend.build(data, FP32)


def test_a_model_with_an_unknown_operator_is_refused_naming_it(backend: Backend) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["y"], name="relu"),
            helper.make_node("FancyOp", ["y"], ["z"], name="mystery", domain="com.example"),
        ],
        "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    with pytest.raises((InvalidModel, BuildFailed), match="FancyOp"):
        backend.build(model_factory.model_bytes(model), FP32)
