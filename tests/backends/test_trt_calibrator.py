"""The IInt8EntropyCalibrator2 adapter: batching and callback logic here, TensorRT itself on a GPU."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pytest

from service.backends.trt_calibrator import CalibrationBatcher, CalibratorState, DeviceBatchFeeder
from service.calibration.algorithms import scale_from_threshold, thresholds_from_histograms
from service.calibration.collect import collect_histograms
from service.calibration.trt_cache import (
    calibration_cache_from_scales,
    scales_from_calibration_cache,
    trt_version_code,
)
from service.errors import BadInput, InvalidCalibrationSet, JobCancelled
from tests.backends.cuda_double import RecordingDevice
from tests.model_factory import model_bytes, two_input_adder

Feeds = Mapping[str, np.ndarray]


def _samples(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.standard_normal((count, 3, 8, 8)).astype(np.float32),
        "bias_map": rng.standard_normal((count, 4, 8, 8)).astype(np.float32),
    }


def _in_chunks(samples: Mapping[str, np.ndarray], sizes: Sequence[int]) -> Iterator[Feeds]:
    start = 0
    for size in sizes:
        yield {name: array[start : start + size] for name, array in samples.items()}
        start += size


def _batcher(
    samples: Mapping[str, np.ndarray], sizes: Sequence[int], batch_size: int, **kw: object
) -> CalibrationBatcher:
    return CalibrationBatcher(
        lambda: _in_chunks(samples, sizes),
        ["image", "bias_map"],
        batch_size=batch_size,
        num_samples=sum(sizes),
        **kw,  # type: ignore[arg-type]
    )


def test_batcher_rebatches_any_incoming_sizes_into_fixed_contiguous_float32_batches() -> None:
    samples = _samples(16)
    batcher = _batcher(samples, [3, 5, 1, 7], batch_size=4)
    batches = list(batcher)
    assert batcher.num_batches == len(batches) == 4
    assert [b.index for b in batches] == [0, 1, 2, 3]
    for batch in batches:
        assert batch.input_names == ("image", "bias_map")
        for array in batch.arrays:
            assert array.dtype == np.float32 and array.flags.c_contiguous and array.shape[0] == 4
    np.testing.assert_array_equal(np.concatenate([b.arrays[0] for b in batches]), samples["image"])
    np.testing.assert_array_equal(np.concatenate([b.arrays[1] for b in batches]), samples["bias_map"])


def test_batcher_drops_the_last_partial_batch() -> None:
    samples = _samples(10)
    batcher = _batcher(samples, [10], batch_size=4)
    assert (batcher.num_batches, batcher.dropped_samples) == (2, 2)
    batches = list(batcher)
    assert len(batches) == 2
    np.testing.assert_array_equal(np.concatenate([b.arrays[0] for b in batches]), samples["image"][:8])


def test_batcher_follows_the_engine_input_order_and_converts_dtypes() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8).transpose(0, 3, 1, 2)  # non-contiguous
    bias = rng.standard_normal((4, 4, 8, 8))  # float64
    feeds: list[Feeds] = [{"image": image, "bias_map": bias, "unused": np.zeros(4)}]  # extras are ignored
    batcher = CalibrationBatcher(
        lambda: iter(feeds),
        ["bias_map", "image"],
        batch_size=2,
        num_samples=4,
    )
    first = next(iter(batcher))
    assert first.input_names == ("bias_map", "image")
    np.testing.assert_array_equal(first.arrays[0], bias[:2].astype(np.float32))
    np.testing.assert_array_equal(first.arrays[1], image[:2].astype(np.float32))
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in first.arrays)
    assert batcher.batch_shapes() == {"bias_map": (2, 4, 8, 8), "image": (2, 3, 8, 8)}


def test_batcher_produces_the_dtype_the_engine_declares_for_an_input() -> None:
    samples = _samples(4)
    batcher = _batcher(samples, [4], batch_size=2, input_dtypes={"bias_map": np.float16})
    first = next(iter(batcher))
    assert [a.dtype for a in first.arrays] == [np.float32, np.float16]
    np.testing.assert_array_equal(first.arrays[1], samples["bias_map"][:2].astype(np.float16))
    with pytest.raises(BadInput, match=r"input_dtypes names \['mask'\], which are not engine inputs"):
        _batcher(samples, [4], batch_size=2, input_dtypes={"mask": np.uint8})


def test_every_pass_yields_the_same_batches_and_never_overwrites_them() -> None:
    batcher = _batcher(_samples(12), [5, 7], batch_size=3)
    first, second = list(batcher), list(batcher)
    assert len(first) == len(second) == 4
    for a, b in zip(first, second, strict=True):
        for x, y in zip(a.arrays, b.arrays, strict=True):
            np.testing.assert_array_equal(x, y)
    assert len({id(array) for batch in first for array in batch.arrays}) == 8


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0, "num_samples": 4}, BadInput, "batch size must be at least 1"),
        ({"batch_size": 8, "num_samples": 4}, InvalidCalibrationSet, "4 samples, fewer than one batch of 8"),
        ({"batch_size": 2, "num_samples": 4, "input_names": []}, BadInput, "non-empty and distinct"),
        ({"batch_size": 2, "num_samples": 4, "input_names": ["a", "a"]}, BadInput, "non-empty and distinct"),
    ],
)
def test_impossible_batching_is_rejected_up_front(
    kwargs: dict[str, object], error: type, message: str
) -> None:
    names = kwargs.pop("input_names", ["image"])
    with pytest.raises(error, match=message):
        CalibrationBatcher(lambda: iter(()), names, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ([{"image": np.zeros((4, 3, 8, 8))}], r"batch 0 lacks the engine inputs \['bias_map'\]"),
        (
            [{"image": np.zeros((4, 3, 8, 8)), "bias_map": np.zeros((3, 4, 8, 8))}],
            "different or missing batch dimensions",
        ),
        (
            [{"image": np.zeros((4, 3, 8, 8)), "bias_map": np.zeros(())}],
            "different or missing batch dimensions",
        ),
        (
            [{"image": np.array([["a"] * 3] * 4), "bias_map": np.zeros((4, 4))}],
            "'image' has dtype <U1; numeric data is required",
        ),
        (
            [
                {"image": np.zeros((1, 3, 8, 8)), "bias_map": np.zeros((1, 4, 8, 8))},
                {"image": np.zeros((3, 3, 4, 4)), "bias_map": np.zeros((3, 4, 8, 8))},
            ],
            r"'image' changes its sample shape from \(3, 8, 8\) to \(3, 4, 4\)",
        ),
        (
            [{"image": np.zeros((3, 3, 8, 8)), "bias_map": np.zeros((3, 4, 8, 8))}],
            "yielded 3 samples, fewer than the 4 it declared",
        ),
    ],
    ids=["missing-input", "uneven-batch", "scalar", "strings", "shape-change", "short"],
)
def test_data_that_cannot_form_batches_is_rejected(chunks: list[Feeds], message: str) -> None:
    batcher = CalibrationBatcher(lambda: iter(chunks), ["image", "bias_map"], batch_size=2, num_samples=4)
    with pytest.raises(InvalidCalibrationSet, match=message):
        list(batcher)


def test_should_stop_cancels_between_batches() -> None:
    served: list[int] = []
    batcher = _batcher(_samples(8), [8], batch_size=2, should_stop=lambda: len(served) >= 2)
    with pytest.raises(JobCancelled, match="cancelled after 2 of 4 batches"):
        for batch in batcher:
            served.append(batch.index)


def test_state_serves_batches_in_the_order_tensorrt_names_them_then_ends() -> None:
    samples = _samples(4)
    state = CalibratorState(_batcher(samples, [4], batch_size=2))
    first = state.next_arrays(["bias_map", "image"])
    assert first is not None
    np.testing.assert_array_equal(first[0], samples["bias_map"][:2])
    np.testing.assert_array_equal(first[1], samples["image"][:2])
    assert state.next_arrays(["image", "bias_map"]) is not None
    assert state.next_arrays(["image", "bias_map"]) is None
    assert state.batches_served == 2
    state.raise_failure()  # nothing failed
    # A second calibration run starts a fresh pass.
    again = state.next_arrays(["image", "bias_map"])
    assert again is not None
    np.testing.assert_array_equal(again[0], samples["image"][:2])


def test_a_failing_batch_ends_calibration_and_is_raised_after_the_build() -> None:
    state = CalibratorState(_batcher(_samples(4), [4], batch_size=2))
    assert state.next_arrays(["image", "mask"]) is None
    assert state.next_arrays(["image", "bias_map"]) is None  # nothing more after a failure
    with pytest.raises(InvalidCalibrationSet, match=r"TensorRT asked for calibration inputs \['mask'\]"):
        state.raise_failure()


def test_without_a_cache_tensorrt_is_told_to_calibrate() -> None:
    state = CalibratorState(_batcher(_samples(2), [2], batch_size=2))
    assert state.read_cache() is None
    assert state.cache_reads == 1


def test_a_given_cache_is_handed_out_with_the_header_of_the_reading_tensorrt() -> None:
    ours = calibration_cache_from_scales({"image": 0.02, "out": 0.5}, trt_version="8.6.1")
    state = CalibratorState(_batcher(_samples(2), [2], batch_size=2), cache=ours, trt_version="10.3.0")
    handed = state.read_cache()
    assert handed is not None and handed.startswith(b"TRT-100300-EntropyCalibration2\n")
    assert scales_from_calibration_cache(handed).scales == scales_from_calibration_cache(ours).scales


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        (b"not a cache", "Line 1 of the calibration cache"),
        (b"TRT-100100-EntropyCalibration2\nx: 7fc00000\n", "scale nan"),
    ],
)
def test_an_unusable_cache_is_rejected_before_any_build(cache: bytes, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        CalibratorState(_batcher(_samples(2), [2], batch_size=2), cache=cache, trt_version="10.1.0")


def test_written_caches_reach_the_callback_as_bytes() -> None:
    received: list[bytes] = []
    state = CalibratorState(_batcher(_samples(2), [2], batch_size=2), on_cache_written=received.append)
    written = b"TRT-100100-EntropyCalibration2\nimage: 3c010204\n"
    state.write_cache(memoryview(bytearray(written)))  # TensorRT hands over a buffer, not bytes
    assert received == [written]
    assert state.written_cache == written


def test_a_failing_cache_callback_is_recorded_not_raised_into_tensorrt() -> None:
    def refuse(data: bytes) -> None:
        raise OSError("disk full")

    state = CalibratorState(_batcher(_samples(2), [2], batch_size=2), on_cache_written=refuse)
    state.write_cache(b"TRT-100100-EntropyCalibration2\n")
    with pytest.raises(OSError, match="disk full"):
        state.raise_failure()


def _tensorrt_and_gpu():  # type: ignore[no-untyped-def]
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("cuda.bindings.driver")
    from service.backends.devices import probe_cuda

    probe = probe_cuda()
    if not probe.has_gpu:
        pytest.skip(f"no usable CUDA device: {probe.reason}")
    if not hasattr(trt, "IInt8EntropyCalibrator2"):
        pytest.skip(f"TensorRT {trt.__version__} has no implicit INT8 calibration (removed in 11)")
    return trt


def _int8_engine(trt, model, calibrator) -> bytes:  # type: ignore[no-untyped-def]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model_bytes(model)), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = calibrator
    engine = builder.build_serialized_network(network, config)
    assert engine is not None
    return bytes(engine)


@pytest.mark.gpu
def test_tensorrt_calibrates_through_the_adapter_and_then_accepts_our_cache() -> None:
    trt = _tensorrt_and_gpu()
    from service.backends.cuda_device import cuda_device
    from service.backends.trt_calibrator import make_entropy_calibrator

    batch = 4
    model = two_input_adder()
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch  # a static batch: no profiles needed
    samples = _samples(16, seed=3)

    written: list[bytes] = []
    device = cuda_device()
    calibrator = make_entropy_calibrator(
        _batcher(samples, [16], batch_size=batch), device=device, cache=None, on_cache_written=written.append
    )
    try:
        _int8_engine(trt, model, calibrator)
        calibrator.state.raise_failure()
    finally:
        calibrator.free()
    assert calibrator.state.batches_served == 4
    assert len(written) == 1
    theirs = scales_from_calibration_cache(written[0])
    assert theirs.version_code == trt_version_code(trt.__version__)
    assert theirs.algorithm == "EntropyCalibration2"
    assert {"image", "bias_map", "out"} <= set(theirs.scales)

    hists = collect_histograms(
        model, lambda: _in_chunks(samples, [batch] * 4), ["image", "bias_map", "conv_out", "relu_out", "out"]
    )
    scales = {
        name: scale_from_threshold(amax)
        for name, amax in thresholds_from_histograms(hists, "entropy").items()
    }
    cached = make_entropy_calibrator(
        _batcher(samples, [16], batch_size=batch),
        device=device,
        cache=calibration_cache_from_scales(scales),  # default header: re-headed for this TensorRT
        on_cache_written=None,
    )
    try:
        _int8_engine(trt, model, cached)
        cached.state.raise_failure()
    finally:
        cached.free()
    assert cached.state.cache_reads >= 1
    assert cached.state.batches_served == 0  # TensorRT took our scales and skipped calibration


def _int64_state(count: int = 4) -> tuple[CalibratorState, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    samples = {"ids": rng.integers(0, 2**40, (count, 16)), "scale": rng.standard_normal((count, 1))}
    batcher = CalibrationBatcher(
        lambda: iter([samples]),
        ["ids", "scale"],
        batch_size=2,
        num_samples=count,
        input_dtypes={"ids": np.int64, "scale": np.float16},
    )
    return CalibratorState(batcher), samples


def test_the_feeder_copies_each_input_with_the_engine_dtype_into_a_buffer_of_its_size() -> None:
    state, samples = _int64_state()
    device = RecordingDevice()
    feeder = DeviceBatchFeeder(state, device)
    pointers = feeder.get_batch(["scale", "ids"])
    assert pointers is not None
    with device.activate():
        np.testing.assert_array_equal(device.read(pointers[1], np.int64, (2, 16)), samples["ids"][:2])
        assert len(device.memory[pointers[1]]) == 2 * 16 * 8  # int64: 8 bytes per element, not 4
        assert len(device.memory[pointers[0]]) == 2 * 1 * 2  # float16
    assert [(c.dtype, c.shape, c.nbytes) for c in device.copies] == [
        ("float16", (2, 1), 4),
        ("int64", (2, 16), 256),
    ]
    second = feeder.get_batch(["scale", "ids"])
    assert second == pointers  # buffers are reused
    assert feeder.get_batch(["scale", "ids"]) is None  # the end of the data
    feeder.free()
    feeder.free()
    assert device.live_allocations == 0
    # Every device call ran inside a push/pop pair; nothing was retained or left pushed.
    assert device.balanced and device.context_log == ["push", "pop"] * 4


def test_a_batch_that_changes_size_fails_instead_of_overrunning_the_buffer() -> None:
    state, _ = _int64_state()
    device = RecordingDevice()
    feeder = DeviceBatchFeeder(state, device)
    assert feeder.get_batch(["ids", "scale"]) is not None
    feeder._buffers["ids"] = (feeder._buffers["ids"][0], 8)  # as if the first batch had been smaller
    assert feeder.get_batch(["ids", "scale"]) is None
    with pytest.raises(InvalidCalibrationSet, match="'ids' changed size between batches"):
        state.raise_failure()
    feeder.free()
    assert device.balanced and device.live_allocations == 0


def test_a_device_error_ends_calibration_and_is_raised_after_the_build() -> None:
    state, _ = _int64_state()
    device = RecordingDevice()

    def fail(nbytes: int) -> int:
        raise RuntimeError("CUDA call cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY")

    device.alloc = fail  # type: ignore[method-assign]
    feeder = DeviceBatchFeeder(state, device)
    assert feeder.get_batch(["ids", "scale"]) is None
    with pytest.raises(RuntimeError, match="CUDA_ERROR_OUT_OF_MEMORY"):
        state.raise_failure()
    assert device.balanced


def test_a_cache_tensorrt_wrote_with_zero_and_infinite_scales_is_handed_back_unchanged() -> None:
    theirs = b"TRT-100800-EntropyCalibration2\nimage: 3c010204\nshape_out: 0\nidx: 7f800000\nneg: bf800000\n"
    state = CalibratorState(_batcher(_samples(2), [2], batch_size=2), cache=theirs, trt_version="10.8.0")
    assert state.read_cache() == theirs
