"""Latency benchmarks on real ONNX Runtime runners: statistics, loops, threads, skips, stage timings."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from types import TracebackType

import numpy as np
import pytest

from service.backends.base import BuildSpec, IOSpec, Runner, ShapeRange, StageTimings, TimedRunner
from service.backends.registry import get_backend
from service.errors import BackendUnavailable, BadInput, JobCancelled
from service.reports.latency import (
    DISTRIBUTION_POINTS,
    NO_STAGES_CPU,
    BenchmarkConfig,
    LatencyStats,
    measure_latency,
)
from service.reports.synthetic_inputs import synthetic_feeds
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder

FP32 = BuildSpec(precision="fp32")


def _runner(*, seed: int, batch: int | str = "N") -> Runner:
    backend = get_backend("onnxruntime")
    built = backend.build(model_bytes(resnet_block_classifier(seed=seed, batch=batch)), FP32)
    return backend.load(built.engine_bytes)


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    with _runner(seed=1) as loaded:
        yield loaded


class GpuStandIn:
    """Stands in for a GPU runner (none here): real CPU inference, stage timings as a GPU reports them."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    @property
    def inputs(self) -> tuple[IOSpec, ...]:
        return self.inner.inputs

    @property
    def outputs(self) -> tuple[IOSpec, ...]:
        return self.inner.outputs

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.infer(feeds)

    def infer_timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], StageTimings]:
        return self.inner.infer(feeds), StageTimings(
            h2d_ms=0.25, compute_ms=1.5, d2h_ms=0.125, device="GPU stand-in"
        )

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> GpuStandIn:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def test_stats_are_exact_percentiles_of_the_samples_and_throughput_counts_samples() -> None:
    samples_ns = [int(ms * 1e6) for ms in range(1, 101)]  # 1..100 ms
    stats = LatencyStats.from_samples(samples_ns, wall_ns=int(2e9), batch_size=8)
    assert (stats.count, stats.min_ms, stats.max_ms) == (100, 1.0, 100.0)
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.std_ms == pytest.approx(np.std(np.arange(1, 101)))
    assert (stats.p50_ms, stats.p90_ms, stats.p95_ms, stats.p99_ms) == pytest.approx(
        (50.5, 90.1, 95.05, 99.01)
    )
    assert stats.calls_per_s == pytest.approx(50.0)
    assert stats.throughput == pytest.approx(400.0)
    assert set(stats.to_dict()) == {"count", "min", "mean", "std", "p50", "p90", "p95", "p99", "max"}


def test_stats_from_nothing_are_refused() -> None:
    with pytest.raises(BadInput, match="No timed calls completed"):
        LatencyStats.from_samples([], wall_ns=1, batch_size=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_sizes": ()}, "at least one batch size"),
        ({"batch_sizes": (1, 1)}, "distinct whole numbers"),
        ({"batch_sizes": (0,)}, "distinct whole numbers from 1"),
        ({"iterations": None}, "exactly one of iterations and duration_s"),
        ({"iterations": 10, "duration_s": 1.0}, "exactly one of iterations and duration_s"),
        ({"iterations": 0}, "iterations must be from 1"),
        ({"iterations": None, "duration_s": 0.0}, "duration_s must be above 0"),
        ({"warmup": -1}, "warmup must be from 0"),
        ({"concurrency": 0}, "concurrency must be from 1"),
    ],
)
def test_benchmark_configs_are_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        BenchmarkConfig(**kwargs)  # type: ignore[arg-type]


def test_each_batch_size_runs_exactly_the_requested_iterations(runner: Runner) -> None:
    config = BenchmarkConfig(batch_sizes=(1, 4), warmup=2, iterations=25)
    progress: list[float] = []
    measurement = measure_latency(runner, config, progress=progress.append)
    assert [r.batch_size for r in measurement.results] == [1, 4]
    for result in measurement.results:
        latency = result.latency
        assert latency.count == 25
        assert (
            0
            < latency.min_ms
            <= latency.p50_ms
            <= latency.p90_ms
            <= latency.p95_ms
            <= latency.p99_ms
            <= latency.max_ms
        )
        assert latency.throughput == pytest.approx(25 * result.batch_size / result.wall_seconds)
        assert len(result.distribution_ms) == 25
        assert list(result.distribution_ms) == sorted(result.distribution_ms)
        assert result.stages is None
    assert measurement.stage_note == NO_STAGES_CPU
    assert progress[-1] == pytest.approx(1.0)
    assert progress == sorted(progress)


def test_serial_throughput_is_the_busy_fraction_of_one_call_per_mean_latency(runner: Runner) -> None:
    result = measure_latency(runner, BenchmarkConfig(batch_sizes=(1,), warmup=2, iterations=50)).results[0]
    busy = result.latency.calls_per_s * result.latency.mean_ms / 1000.0  # share of wall time spent in calls
    assert 0.5 < busy <= 1.0


def test_a_duration_bound_runs_until_the_time_is_up(runner: Runner) -> None:
    config = BenchmarkConfig(batch_sizes=(2,), warmup=0, iterations=None, duration_s=0.3)
    result = measure_latency(runner, config).results[0]
    assert result.wall_seconds >= 0.3
    assert result.latency.count >= 2
    assert len(result.distribution_ms) == min(DISTRIBUTION_POINTS, result.latency.count)


def test_threads_share_the_runner_and_the_iteration_count(runner: Runner) -> None:
    config = BenchmarkConfig(batch_sizes=(1,), warmup=1, iterations=40, concurrency=3)
    result = measure_latency(runner, config).results[0]
    assert result.latency.count == 40


def test_batch_sizes_a_fixed_batch_engine_cannot_take_are_skipped_with_the_reason() -> None:
    with _runner(seed=2, batch=1) as fixed:
        measurement = measure_latency(fixed, BenchmarkConfig(batch_sizes=(1, 8), warmup=0, iterations=3))
    assert [r.batch_size for r in measurement.results] == [1]
    assert [s.batch_size for s in measurement.skipped] == [8]
    assert "input 'input' has a fixed batch of 1" in measurement.skipped[0].reason


def test_dynamic_dims_take_the_profile_or_the_build_shapes_or_are_skipped() -> None:
    spec = IOSpec(name="x", dtype="float32", shape=("N", 3, "H", "W"))
    with pytest.raises(BadInput, match=r"axis 2 is dynamic \('H'\)"):
        synthetic_feeds([spec], 2)
    given = ShapeRange(min=(1, 3, 8, 8), opt=(2, 3, 32, 24), max=(4, 3, 64, 64))
    assert synthetic_feeds([spec], 4, shapes={"x": given})["x"].shape == (4, 3, 32, 24)
    with pytest.raises(BadInput, match=r"takes batches 1\.\.4"):
        synthetic_feeds([spec], 5, shapes={"x": given})
    profiled = IOSpec(name="x", dtype="float32", shape=("N", 3, "H", "W"), profile=given)
    assert synthetic_feeds([profiled], 1)["x"].shape == (1, 3, 32, 24)


def test_synthetic_inputs_are_valid_for_their_dtype_and_seeded() -> None:
    specs = [
        IOSpec("f", "float16", ("N", 4)),
        IOSpec("ids", "int64", ("N", 3)),
        IOSpec("px", "uint8", ("N", 2)),
        IOSpec("mask", "bool", ("N",)),
    ]
    feeds = synthetic_feeds(specs, 2, seed=5)
    assert {k: v.dtype.name for k, v in feeds.items()} == {
        "f": "float16",
        "ids": "int64",
        "px": "uint8",
        "mask": "bool",
    }
    assert not feeds["ids"].any() and not feeds["mask"].any()
    np.testing.assert_array_equal(feeds["f"], synthetic_feeds(specs, 2, seed=5)["f"])


def test_multi_input_models_get_every_input_at_the_batch_size() -> None:
    backend = get_backend("onnxruntime")
    with backend.load(backend.build(model_bytes(two_input_adder()), FP32).engine_bytes) as adder:
        result = measure_latency(adder, BenchmarkConfig(batch_sizes=(3,), warmup=0, iterations=2)).results[0]
    assert result.latency.count == 2


def test_a_stop_request_cancels_the_benchmark(runner: Runner) -> None:
    deadline = time.monotonic() + 0.2
    config = BenchmarkConfig(batch_sizes=(1,), warmup=0, iterations=None, duration_s=30.0)
    started = time.monotonic()
    with pytest.raises(JobCancelled, match="stopped before it finished"):
        measure_latency(runner, config, should_stop=lambda: time.monotonic() > deadline)
    assert time.monotonic() - started < 5


def test_a_runner_failure_in_a_worker_thread_reaches_the_caller() -> None:
    closed = _runner(seed=3)
    closed.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        measure_latency(closed, BenchmarkConfig(batch_sizes=(1,), warmup=0, iterations=5, concurrency=2))


def test_gpu_stage_timings_are_summarised_separately(runner: Runner) -> None:
    stand_in = GpuStandIn(runner)
    assert isinstance(stand_in, TimedRunner)
    measurement = measure_latency(stand_in, BenchmarkConfig(batch_sizes=(1,), warmup=0, iterations=5))
    stages = measurement.results[0].stages
    assert stages is not None and stages.device == "GPU stand-in"
    assert (stages.h2d.p50_ms, stages.compute.mean_ms, stages.d2h.p99_ms) == (0.25, 1.5, 0.125)
    assert measurement.stage_note == ""
