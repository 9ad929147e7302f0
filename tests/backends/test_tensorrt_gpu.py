"""Enterprise TensorRT (10.x/11.x) with cuda-python on a real NVIDIA GPU, and TensorRT-RTX engines run there.

Every test is marked ``gpu`` and skips, with the backend's own reason, where TensorRT, cuda-python or a GPU
is missing. Nothing here is simulated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxconverter_common import float16

from service.backends._trt_runner import TrtRunner
from service.backends.base import Backend, BuildSpec, BuiltEngine, ShapeRange
from service.backends.registry import get_backend
from service.backends.tensorrt import TensorRtBackend
from tests import model_factory
from tests.backends.conftest import BuildCache, op_types, reference_outputs
from tests.backends.qdq_models import hand_qdq_model

pytestmark = pytest.mark.gpu

PROFILE = {"input": ShapeRange((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))}


@pytest.fixture(scope="module")
def trt_backend() -> TensorRtBackend:
    backend = get_backend("tensorrt")
    availability = backend.available()
    if not (availability.can_build and availability.can_run):
        pytest.skip(f"tensorrt: {availability.reason}")
    assert isinstance(backend, TensorRtBackend)
    return backend


@pytest.fixture(scope="module")
def implicit_precision(trt_backend: TensorRtBackend) -> None:
    if trt_backend.describe().strongly_typed:
        pytest.skip(
            f"TensorRT {trt_backend.describe().version} is strongly typed: no calibrator or precision flags"
        )


@pytest.fixture(scope="module")
def fp32_engine(
    trt_backend: TensorRtBackend, builds: BuildCache, resnet_block: onnx.ModelProto
) -> BuiltEngine:
    return builds.get(
        trt_backend, "resnet_block_fp32_profile", resnet_block, BuildSpec("fp32", shapes=PROFILE)
    )


def _calibration_batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"input": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(4)]


def test_fp32_engine_matches_onnxruntime_across_the_profile(
    trt_backend: TensorRtBackend, fp32_engine: BuiltEngine, resnet_block: onnx.ModelProto, image_batch
) -> None:
    with trt_backend.load(fp32_engine.engine_bytes) as runner:
        assert runner.inputs[0].profile == PROFILE["input"]
        for batch in (1, 4, 8):
            feeds = {"input": image_batch(batch, 16)}
            expected = reference_outputs(resnet_block, feeds)["logits"]
            np.testing.assert_allclose(runner.infer(feeds)["logits"], expected, rtol=1e-3, atol=1e-4)


def test_fp32_build_runs_without_tf32_and_says_so(fp32_engine: BuiltEngine) -> None:
    assert "TF32 disabled" in fp32_engine.build_log


def test_inspector_report_names_every_compute_node(
    fp32_engine: BuiltEngine, resnet_block: onnx.ModelProto
) -> None:
    report = fp32_engine.layer_report
    assert report.source == "engine_inspector"
    for name, op in op_types(resnet_block).items():
        if op in ("Conv", "Gemm"):
            assert report.layers_for_node(name), name
    assert all(layer.input_dtypes != ("unknown",) for layer in report.layers if not layer.is_reformat)


def test_timings_are_measured_per_stage_with_cuda_events(
    trt_backend: TensorRtBackend, fp32_engine: BuiltEngine, image_batch
) -> None:
    with trt_backend.load(fp32_engine.engine_bytes) as runner:
        _, first = runner.infer_timed({"input": image_batch(4, 16)})
        _, second = runner.infer_timed({"input": image_batch(4, 16)})
    for timings in (first, second):
        assert timings.h2d_ms > 0 and timings.compute_ms > 0 and timings.d2h_ms > 0
        assert timings.device == trt_backend.describe().device.rsplit(" (", 1)[0]


def test_cuda_graph_runner_launches_a_graph_and_gives_the_ordinary_results(
    trt_backend: TensorRtBackend, builds: BuildCache, image_batch
) -> None:
    graphed = TensorRtBackend(cuda_graph=True)
    static = model_factory.resnet_block_classifier(batch=1)
    built = builds.get(graphed, "resnet_block_static_batch1", static, BuildSpec("fp32"))
    feeds = {"input": image_batch(1, 16)}
    expected = reference_outputs(static, feeds)["logits"]
    with graphed.load(built.engine_bytes) as runner:
        results = [runner.infer(feeds)["logits"] for _ in range(3)]  # 1st ordinary, then captured graph
        assert isinstance(runner, TrtRunner)
        assert runner.graph_note.startswith("on"), runner.graph_note
        assert runner.graph_launches == 2  # the 2nd and 3rd calls ran the captured graph
    for result in results:
        np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-4)


def test_fp16_build_has_half_precision_layers(
    trt_backend: TensorRtBackend, builds: BuildCache, resnet_block: onnx.ModelProto
) -> None:
    model = resnet_block
    if trt_backend.describe().strongly_typed:
        model = float16.convert_float_to_float16(resnet_block, keep_io_types=True)
    built = builds.get(trt_backend, "resnet_block_fp16", model, BuildSpec("fp16", shapes=PROFILE))
    assert built.layer_report.precision_counts().get("fp16", 0) >= 1


def test_qdq_model_builds_int8_layers(trt_backend: TensorRtBackend, builds: BuildCache) -> None:
    model = hand_qdq_model(model_factory.resnet_block_classifier(batch=1))
    built = builds.get(trt_backend, "resnet_block_hand_qdq", model, BuildSpec("int8"))
    assert built.layer_report.precision_counts().get("int8", 0) >= 4


def test_entropy_calibrator_writes_a_cache_that_a_later_build_reuses(
    trt_backend: TensorRtBackend, implicit_precision: None, resnet_block: onnx.ModelProto
) -> None:
    batches = _calibration_batches()
    spec = BuildSpec(
        "int8", shapes=PROFILE, calibration_batches=lambda: iter(batches), calibration_batch_size=8
    )
    calibrated = trt_backend.build(model_factory.model_bytes(resnet_block), spec)
    assert calibrated.calibration_cache is not None
    assert calibrated.calibration_cache.startswith(b"TRT-")
    assert calibrated.layer_report.precision_counts().get("int8", 0) >= 1
    from_cache = trt_backend.build(
        model_factory.model_bytes(resnet_block),
        BuildSpec("int8", shapes=PROFILE, calibration_cache=calibrated.calibration_cache),
    )
    assert from_cache.layer_report.precision_counts().get("int8", 0) >= 1


def test_kept_layers_stay_out_of_int8(
    trt_backend: TensorRtBackend, implicit_precision: None, resnet_block: onnx.ModelProto
) -> None:
    batches = _calibration_batches()
    spec = BuildSpec(
        "int8", shapes=PROFILE, keep_layers=("head_conv",), calibration_batches=lambda: iter(batches)
    )
    built = trt_backend.build(model_factory.model_bytes(resnet_block), spec)
    assert "pinned to" in built.build_log
    head = [layer for layer in built.layer_report.layers_for_node("head_conv") if not layer.is_reformat]
    assert head and all(layer.precision != "int8" for layer in head)


def test_timing_cache_is_written_per_gpu_and_reused(trt_backend: TensorRtBackend, tmp_path: Path) -> None:
    model = model_factory.model_bytes(model_factory.two_input_adder())
    shapes = {
        "image": ShapeRange((1, 3, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8)),
        "bias_map": ShapeRange((1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8)),
    }
    spec = BuildSpec("fp32", shapes=shapes, timing_cache_path=str(tmp_path / "timing.cache"))
    trt_backend.build(model, spec)
    info = trt_backend.describe()
    written = tmp_path / f"timing.{info.compute_capability}.trt{info.version}.cache"
    assert written.exists() and written.stat().st_size > 0
    again = trt_backend.build(model, spec)
    assert "does not match" not in again.build_log


def test_tensorrt_rtx_engine_runs_on_a_gpu_it_targets(
    builds: BuildCache, resnet_block: onnx.ModelProto, image_batch
) -> None:
    rtx: Backend = get_backend("tensorrt-rtx")
    availability = rtx.available()
    if not availability.can_run:
        pytest.skip(f"tensorrt-rtx: {availability.reason}")
    built = builds.get(rtx, "resnet_block_fp32", resnet_block, BuildSpec("fp32"))
    feeds = {"input": image_batch(1, 16)}
    with rtx.load(built.engine_bytes) as runner:
        outputs, timings = runner.infer_timed(feeds)  # type: ignore[attr-defined]
    np.testing.assert_allclose(
        outputs["logits"], reference_outputs(resnet_block, feeds)["logits"], rtol=1e-3, atol=1e-4
    )
    assert timings.compute_ms > 0
