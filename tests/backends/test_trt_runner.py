"""TrtRunner logic on a recording CUDA device and a TensorRT runtime stand-in (no GPU exists here).

What these tests prove: the bytes, addresses, dtypes and shapes the runner hands to CUDA and TensorRT,
its context pushes/pops and frees, CUDA-graph capture and launch, and the runtime-cache handling. What
they cannot prove: that a real GPU and TensorRT behave as the doubles do (the ``gpu`` tests do that
where a GPU is lent).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from service.backends._trt_runner import TrtRunner
from service.errors import EngineNotRunnableHere, InvalidInferenceInput
from tests.backends import trt_double
from tests.backends.cuda_double import RecordingDevice
from tests.backends.trt_double import DataType, doubling_engine, fake_tensorrt


def _runner(device: RecordingDevice, engine: trt_double.FakeEngine, **kwargs: object) -> TrtRunner:
    return TrtRunner(fake_tensorrt(engine), b"plan", label="TensorRT", device=device, **kwargs)  # type: ignore[arg-type]


def test_a_static_engine_gets_exactly_its_bytes_and_returns_the_result() -> None:
    device = RecordingDevice()
    with _runner(device, doubling_engine(device)) as runner:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], x * 2)
    h2d = [c for c in device.copies if c.direction == "h2d"]
    assert [(c.nbytes, c.dtype, c.shape) for c in h2d] == [(32, "float32", (2, 4))]
    assert all(c.stream is not None for c in device.copies)


def test_a_wrong_size_feed_for_a_static_input_is_refused_before_any_copy() -> None:
    device = RecordingDevice()
    with _runner(device, doubling_engine(device)) as runner:
        with pytest.raises(
            InvalidInferenceInput, match=r"shape \[4, 4\]; this engine was built for exactly \[2, 4\]"
        ):
            runner.infer({"x": np.zeros((4, 4), np.float32)})
        with pytest.raises(InvalidInferenceInput, match=r"shape \[8\]"):
            runner.infer({"x": np.zeros(8, np.float32)})  # same byte count, wrong shape
    assert device.copies == []


def test_a_dynamic_input_is_checked_against_its_static_dims_and_profile() -> None:
    device = RecordingDevice()
    engine = doubling_engine(device, dims=(-1, 4), profile=((1, 4), (2, 4), (4, 4)))
    with _runner(device, engine) as runner:
        x = np.ones((3, 4), np.float32)
        np.testing.assert_array_equal(runner.infer({"x": x})["y"], x * 2)
        with pytest.raises(InvalidInferenceInput, match="outside the engine's profile"):
            runner.infer({"x": np.ones((3, 5), np.float32)})
        with pytest.raises(InvalidInferenceInput, match="outside the engine's profile"):
            runner.infer({"x": np.ones((5, 4), np.float32)})


def test_int64_io_is_copied_as_int64() -> None:
    device = RecordingDevice()
    with _runner(device, doubling_engine(device, dtype=DataType.INT64)) as runner:
        y = runner.infer({"x": np.array([[1, 2, 3, 4], [5, 6, 7, 2**40]])})["y"]
    assert y.dtype == np.int64 and y[1, 3] == 2**41
    assert {c.dtype for c in device.copies} == {"int64"}


def test_bf16_io_is_refused_at_load_with_a_clear_error() -> None:
    device = RecordingDevice()
    with pytest.raises(EngineNotRunnableHere, match=r"input 'x' has type DataType\.BF16, which numpy cannot"):
        _runner(device, doubling_engine(device, dtype=DataType.BF16))
    assert device.balanced and not device.streams and not device.events and device.live_allocations == 0


def test_closing_frees_every_buffer_stream_event_and_graph_inside_the_context() -> None:
    device = RecordingDevice()
    runner = _runner(device, doubling_engine(device), cuda_graph=True)
    for _ in range(2):
        runner.infer({"x": np.ones((2, 4), np.float32)})
    assert device.live_allocations == 2 and len(device.events) == 4 and len(device.streams) == 1
    runner.close()
    runner.close()  # idempotent
    assert device.live_allocations == 0 and not device.pinned
    assert not device.streams and not device.events and not device.graphs
    assert device.balanced  # every push was popped; the runner never holds the context between calls


def test_a_cuda_graph_is_captured_after_the_first_call_and_launched_afterwards() -> None:
    device = RecordingDevice()
    engine = doubling_engine(device)
    with _runner(device, engine, cuda_graph=True) as runner:
        assert runner.graph_note.startswith("on")
        results = [runner.infer({"x": np.full((2, 4), i, np.float32)})["y"] for i in range(4)]
        assert runner.graph_launches == 3
    assert device.captures == 1 and len(device.graph_launches) == 3
    assert engine.contexts[0].executions == 4  # 1 ordinary run, 3 graph replays
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, np.full((2, 4), 2 * i, np.float32))


def test_without_cuda_graph_or_with_dynamic_shapes_no_graph_is_used_and_the_runner_says_why() -> None:
    device = RecordingDevice()
    dynamic = doubling_engine(device, dims=(-1, 4), profile=((1, 4), (2, 4), (4, 4)))
    with _runner(device, dynamic, cuda_graph=True) as runner:
        runner.infer({"x": np.ones((2, 4), np.float32)})
        runner.infer({"x": np.ones((2, 4), np.float32)})
        assert runner.graph_note == "off: the engine has dynamic input shapes"
        assert runner.graph_launches == 0
    assert device.captures == 0


def test_the_runtime_cache_is_written_after_the_first_call_and_loaded_next_time(tmp_path: Path) -> None:
    file = tmp_path / "engines" / "runtime_caches" / "e1.runtime.cache"
    device = RecordingDevice()
    engine = doubling_engine(device)
    with _runner(device, engine, runtime_cache=file) as runner:
        runner.infer({"x": np.ones((2, 4), np.float32)})
        assert file.read_bytes() == b"kernels for doubler"
    second = doubling_engine(device)
    with _runner(device, second, runtime_cache=file):
        config = second.contexts[0].config
        assert config is not None and config.cache is not None
        assert config.cache.loaded == [b"kernels for doubler"]  # handed to TensorRT-RTX before running


def test_a_runtime_cache_from_another_gpu_is_replaced(tmp_path: Path) -> None:
    file = tmp_path / "e1.runtime.cache"
    file.write_bytes(b"from another GPU")
    device = RecordingDevice()
    with _runner(device, doubling_engine(device), runtime_cache=file) as runner:
        runner.infer({"x": np.ones((2, 4), np.float32)})
    assert file.read_bytes() == b"kernels for doubler"


def test_the_runtime_double_uses_only_names_tensorrt_rtx_has() -> None:
    trt = pytest.importorskip("tensorrt_rtx")
    pairs = [
        (trt_double.FakeEngine, trt.ICudaEngine),
        (trt_double.FakeContext, trt.IExecutionContext),
        (trt_double.FakeRuntimeConfig, trt.IRuntimeConfig),
        (trt_double.FakeRuntimeCache, trt.IRuntimeCache),
        (trt_double.DataType, trt.DataType),
        (trt_double.TensorIOMode, trt.TensorIOMode),
    ]
    for double, real in pairs:
        names = [
            name
            for name, _ in inspect.getmembers(double)
            if not name.startswith("_")
            and name not in ("engine", "config", "shapes", "addresses")
            and name not in ("executions", "captured", "replay", "loaded", "kernels", "cache")
            and name not in ("name", "device", "tensors", "profile", "contexts", "value")
        ]
        missing = [name for name in names if not hasattr(real, name)]
        assert not missing, f"{double.__name__} uses {missing}, which {real.__name__} does not have"
