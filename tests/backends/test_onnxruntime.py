"""ONNX Runtime backend specifics: the engine's build record, reopening it, Q/DQ engines, concurrency
and inference errors."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest

from service.backends.base import BuildSpec, BuiltEngine, ShapeRange
from service.backends.onnxruntime import (
    META_BACKEND,
    META_OPTIONS,
    META_PRECISION,
    META_SHAPES,
    META_VERSION,
    OnnxRuntimeBackend,
)
from service.backends.registry import get_backend
from service.errors import (
    BackendUnavailable,
    BadInput,
    EngineNotRunnableHere,
    InvalidInferenceInput,
    InvalidModel,
)
from tests import model_factory
from tests.backends.conftest import BuildCache, reference_outputs
from tests.backends.qdq_models import hand_qdq_model

ADDER_SHAPES = {
    "image": ShapeRange((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)),
    "bias_map": ShapeRange((1, 4, 8, 8), (2, 4, 8, 8), (4, 4, 8, 8)),
}


@pytest.fixture(scope="module")
def backend() -> OnnxRuntimeBackend:
    backend = get_backend("onnxruntime")
    assert isinstance(backend, OnnxRuntimeBackend)
    return backend


@pytest.fixture(scope="module")
def adder_engine(backend: OnnxRuntimeBackend, builds: BuildCache) -> BuiltEngine:
    spec = BuildSpec(precision="fp32", shapes=ADDER_SHAPES)
    return builds.get(backend, "two_input_adder_profiled", model_factory.two_input_adder(), spec)


def _adder_feeds(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch)
    return {
        "image": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32),
        "bias_map": rng.standard_normal((batch, 4, 8, 8)).astype(np.float32),
    }


def test_engine_is_an_onnx_model_carrying_its_build_record(adder_engine: BuiltEngine) -> None:
    assert adder_engine.file_extension == ".onnx"
    engine = onnx.load_from_string(adder_engine.engine_bytes)
    meta = {prop.key: prop.value for prop in engine.metadata_props}
    assert meta[META_BACKEND] == "onnxruntime"
    assert meta[META_VERSION] == adder_engine.info.version
    assert meta[META_PRECISION] == "fp32"
    assert json.loads(meta[META_OPTIONS])["load_graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert json.loads(meta[META_SHAPES])["image"] == {
        "min": [1, 3, 8, 8],
        "opt": [2, 3, 8, 8],
        "max": [4, 3, 8, 8],
    }


def test_reopened_engine_reports_io_with_dynamic_dims_and_profiles(
    backend: OnnxRuntimeBackend, adder_engine: BuiltEngine
) -> None:
    with backend.load(adder_engine.engine_bytes) as runner:
        image = next(spec for spec in runner.inputs if spec.name == "image")
        assert image.shape == ("N", 3, 8, 8) and image.dtype == "float32"
        assert image.profile == ADDER_SHAPES["image"]
        assert [(spec.name, spec.shape) for spec in runner.outputs] == [("out", ("N", 4, 8, 8))]


def test_two_input_engine_matches_the_reference_at_several_batch_sizes(
    backend: OnnxRuntimeBackend, adder_engine: BuiltEngine
) -> None:
    with backend.load(adder_engine.engine_bytes) as runner:
        for batch in (1, 3):
            feeds = _adder_feeds(batch)
            expected = reference_outputs(model_factory.two_input_adder(), feeds)["out"]
            np.testing.assert_allclose(runner.infer(feeds)["out"], expected, rtol=1e-5, atol=1e-6)


def test_concurrent_calls_on_one_runner_give_the_sequential_results(
    backend: OnnxRuntimeBackend, adder_engine: BuiltEngine
) -> None:
    feeds = [_adder_feeds(batch) for batch in (1, 2, 3, 4) * 3]
    with backend.load(adder_engine.engine_bytes) as runner:
        sequential = [runner.infer(feed)["out"] for feed in feeds]
        with ThreadPoolExecutor(max_workers=4) as pool:
            concurrent = list(pool.map(lambda feed: runner.infer(feed)["out"], feeds))
    for one, other in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(one, other)


def test_qdq_engine_runs_int8_kernels_and_matches_the_qdq_reference(
    backend: OnnxRuntimeBackend, builds: BuildCache
) -> None:
    from service.quantize.bn_fold import fold_batchnorm

    model = hand_qdq_model(fold_batchnorm(model_factory.resnet_block_classifier()))
    built = builds.get(backend, "resnet_block_folded_hand_qdq", model, BuildSpec(precision="int8"))
    assert built.layer_report.precision_counts()["int8"] >= 1
    assert any(layer.type == "QLinearConv" for layer in built.layer_report.layers)
    batch = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    expected = reference_outputs(model, {"input": batch})["logits"]
    with backend.load(built.engine_bytes) as runner:
        np.testing.assert_allclose(runner.infer({"input": batch})["logits"], expected, rtol=1e-4, atol=1e-4)


def test_an_int8_request_on_an_fp32_model_is_built_with_a_warning(backend: OnnxRuntimeBackend) -> None:
    built = backend.build(
        model_factory.model_bytes(model_factory.two_input_adder(size=4)), BuildSpec(precision="int8")
    )
    assert "no Q/DQ nodes; it runs in FP32" in built.build_log
    assert "int8" not in built.layer_report.precision_counts()


def test_an_onnx_model_without_a_build_record_is_not_an_engine(backend: OnnxRuntimeBackend) -> None:
    with pytest.raises(InvalidModel, match="not an ONNX Runtime engine built by this service"):
        backend.load(model_factory.model_bytes(model_factory.two_input_adder()))


def test_an_engine_from_another_onnxruntime_version_must_be_rebuilt(
    backend: OnnxRuntimeBackend, adder_engine: BuiltEngine
) -> None:
    engine = onnx.load_from_string(adder_engine.engine_bytes)
    for prop in engine.metadata_props:
        if prop.key == META_VERSION:
            prop.value = "0.9.0"
    with pytest.raises(EngineNotRunnableHere, match=r"optimized by ONNX Runtime 0\.9\.0.*Rebuild"):
        backend.load(engine.SerializeToString())


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"image": np.zeros((1, 3, 8, 8), np.float32)}, r"Inputs \['bias_map'\] are missing"),
        (
            {"image": np.zeros((1, 3, 8, 8), np.float32), "bias_map": np.zeros((1, 4, 5, 5), np.float32)},
            "rejected",
        ),
        (
            {"image": np.zeros((1, 3, 8, 8), np.float64), "bias_map": np.zeros((1, 4, 8, 8), np.float32)},
            "rejected",
        ),
    ],
    ids=["missing", "wrong-shape", "wrong-dtype"],
)
def test_inputs_the_engine_cannot_take_are_invalid_inference_input(
    backend: OnnxRuntimeBackend, adder_engine: BuiltEngine, feeds: dict[str, np.ndarray], message: str
) -> None:
    with (
        backend.load(adder_engine.engine_bytes) as runner,
        pytest.raises(InvalidInferenceInput, match=message),
    ):
        runner.infer(feeds)


def test_a_closed_runner_refuses_work(backend: OnnxRuntimeBackend, adder_engine: BuiltEngine) -> None:
    runner = backend.load(adder_engine.engine_bytes)
    runner.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        runner.infer(_adder_feeds(1))


def test_runner_thread_count_is_validated() -> None:
    with pytest.raises(BadInput, match="intra_op_threads"):
        OnnxRuntimeBackend(intra_op_threads=0)
    assert OnnxRuntimeBackend(intra_op_threads=1).intra_op_threads == 1


def test_device_names_the_cpu_and_its_vector_instruction_set(backend: OnnxRuntimeBackend) -> None:
    info = backend.describe()
    assert info.device.startswith("CPU (") and "cores)" in info.device
    assert info.compute_capability is None and info.strongly_typed
