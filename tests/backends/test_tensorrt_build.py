"""Enterprise TensorRT build logic that runs here: the helpers exercised with TensorRT-RTX's real builder,
network, config and logger objects (same API), and the calibration plan as pure logic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from service.backends import _trt_common as common
from service.backends._trt_calibration import NetworkInput, calibration_plan, network_inputs
from service.backends.tensorrt import _load_timing_cache, engine_then_calibration_failure
from service.backends.trt_calibrator import CalibrationBatcher, CalibratorState
from service.errors import BadInput, BuildFailed, InvalidCalibrationSet, JobCancelled

trt = pytest.importorskip("tensorrt_rtx")


def _config() -> Any:
    return trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()


def test_the_enterprise_logger_keeps_nothing_below_warning() -> None:
    logger = common.capturing_logger(trt, keep="WARNING")
    for severity in (trt.ILogger.VERBOSE, trt.ILogger.INFO, trt.ILogger.WARNING, trt.ILogger.ERROR):
        logger.log(severity, f"message at {severity.name}")
    assert [r.severity for r in logger.records] == ["WARNING", "ERROR"]


def test_the_rtx_logger_keeps_verbose_for_the_layer_dump() -> None:
    logger = common.capturing_logger(trt, keep="VERBOSE")
    logger.log(trt.ILogger.VERBOSE, "Layers: ...")
    assert [r.message for r in logger.records] == ["Layers: ..."]


def test_an_fp32_build_config_has_tf32_cleared_and_says_so() -> None:
    config = _config()
    assert config.get_flag(trt.BuilderFlag.TF32)  # TensorRT's default
    note = common.disable_tf32(trt, config)
    assert not config.get_flag(trt.BuilderFlag.TF32)
    assert "TF32 disabled" in note


def _empty_network_build() -> bytes:
    logger = common.capturing_logger(trt, keep="WARNING")
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # no outputs: TensorRT refuses to build it
    return common.engine_from_network(builder, network, builder.create_builder_config(), logger.records, "X")


def _state() -> CalibratorState:
    batcher = CalibrationBatcher(lambda: iter(()), ["x"], batch_size=1, num_samples=1)
    return CalibratorState(batcher)


@pytest.mark.parametrize(
    "failure", [JobCancelled("cancelled during calibration"), InvalidCalibrationSet("batch 3 lacks 'x'")]
)
def test_a_calibrator_failure_is_raised_instead_of_the_build_failure_it_caused(failure: Exception) -> None:
    state = _state()
    state.record_failure(failure)
    with pytest.raises(type(failure)) as raised:
        engine_then_calibration_failure(_empty_network_build, state)
    assert raised.value is failure


def test_without_a_calibrator_failure_the_build_failure_stands() -> None:
    with pytest.raises(BuildFailed, match="Network must have at least one output"):
        engine_then_calibration_failure(_empty_network_build, _state())


class _StrictTimingCacheConfig:
    """Enterprise TensorRT 10 raises on a corrupt timing cache and refuses set_timing_cache(None)."""

    def __init__(self) -> None:
        self.cache: bytes | None = None

    def create_timing_cache(self, data: bytes) -> bytes:
        if data and not data.startswith(b"TIMING"):
            raise RuntimeError("Failed to deserialize the timing cache")
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        if cache is None:
            raise TypeError("set_timing_cache(): incompatible function arguments")
        self.cache = cache
        return True


def test_a_corrupt_timing_cache_file_is_replaced_by_an_empty_cache(tmp_path: Path) -> None:
    file = tmp_path / "timing.sm_89.trt10.8.0.cache"
    file.write_bytes(b"\x00garbage")
    config, notes = _StrictTimingCacheConfig(), []
    _load_timing_cache(config, file, notes)
    assert config.cache == b""
    assert notes == [f"timing cache {file} is corrupt or from another GPU/TensorRT; starting an empty one"]


def _model(inputs: list[onnx.ValueInfoProto]) -> bytes:
    nodes = [helper.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [
        helper.make_tensor_value_info(f"{i.name}_out", i.type.tensor_type.elem_type, None) for i in inputs
    ]
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_network_inputs_carry_the_network_dtypes_and_dims() -> None:
    model = _model(
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [4, 16]),
            helper.make_tensor_value_info("mask", TensorProto.INT32, [4, 16]),
            helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["n", 3, 8, 8]),
        ]
    )
    logger = common.capturing_logger(trt, keep="WARNING")
    builder = trt.Builder(logger)
    network, _parser = common.network_from_onnx(trt, builder, logger, model, strongly_typed=True, label="X")
    inputs = network_inputs(trt, network)
    assert [(i.name, i.dtype, i.dims) for i in inputs] == [
        ("ids", np.dtype(np.int64), (4, 16)),
        ("mask", np.dtype(np.int32), (4, 16)),
        ("image", np.dtype(np.float16), (-1, 3, 8, 8)),
    ]


def _inputs() -> list[NetworkInput]:
    return [
        NetworkInput("ids", np.dtype(np.int64), (4, 16)),
        NetworkInput("image", np.dtype(np.float16), (-1, 3, 8, 8)),
    ]


def test_a_static_batch_dimension_sets_the_calibration_batch_size() -> None:
    plan = calibration_plan(_inputs(), requested_batch=8)
    assert plan.batch_size == 4
    assert plan.notes == (
        "calibration batch size 8 replaced by 4: inputs ['ids'] have a static batch dimension of 4",
    )
    assert plan.profiled == ("image",)  # only the dynamic input gets a calibration profile
    assert plan.dtypes == {"ids": np.dtype(np.int64), "image": np.dtype(np.float16)}


def test_a_dynamic_network_keeps_the_requested_batch() -> None:
    plan = calibration_plan([NetworkInput("x", np.dtype(np.float32), (-1, 3))], requested_batch=8)
    assert (plan.batch_size, plan.notes, plan.profiled) == (8, (), ("x",))


def test_static_inputs_with_different_batches_cannot_be_calibrated() -> None:
    inputs = [
        NetworkInput("a", np.dtype(np.float32), (2, 3)),
        NetworkInput("b", np.dtype(np.float32), (4, 3)),
    ]
    with pytest.raises(BadInput, match=r"different static batch dimensions \{'a': 2, 'b': 4\}"):
        calibration_plan(inputs, requested_batch=8)


def test_batches_follow_the_plan_dtypes_and_reject_samples_of_the_wrong_shape() -> None:
    plan = calibration_plan(_inputs(), requested_batch=8)
    rng = np.random.default_rng(0)
    feeds = {"ids": rng.integers(0, 2**40, (8, 16)), "image": rng.standard_normal((8, 3, 8, 8))}
    batcher = CalibrationBatcher(
        lambda: iter([feeds]),
        plan.input_names,
        batch_size=plan.batch_size,
        num_samples=8,
        input_dtypes=plan.dtypes,
        input_shapes=plan.dims,
    )
    first = next(iter(batcher))
    assert [(a.dtype, a.shape) for a in first.arrays] == [
        (np.dtype(np.int64), (4, 16)),
        (np.dtype(np.float16), (4, 3, 8, 8)),
    ]
    np.testing.assert_array_equal(first.arrays[0], feeds["ids"][:4])  # int64 values survive exactly
    wrong = {"ids": np.zeros((8, 12), np.int64), "image": feeds["image"]}
    batcher = CalibrationBatcher(
        lambda: iter([wrong]), plan.input_names, batch_size=4, num_samples=8, input_shapes=plan.dims
    )
    with pytest.raises(
        InvalidCalibrationSet,
        match=r"'ids' has samples of shape \[12\], but the network's input is \[4, 16\]",
    ):
        list(batcher)
