"""Latency benchmarks of a loaded runner: per batch size, with warm-up, iterations or a duration, and threads.

``measure_latency(runner, config)`` feeds synthetic inputs of each requested batch size to the
runner: ``warmup`` untimed calls, then ``iterations`` timed calls (or as many as fit in
``duration_s``) spread over ``concurrency`` threads sharing the one runner. Each call is timed with
``time.perf_counter_ns``; a call's latency is the wall-clock time of ``infer`` (``infer_timed`` on
runners that have it), so it includes whatever queueing the runner does when threads contend.

Statistics (:class:`LatencyStats`): min, mean, population std, max and the 50/90/95/99th percentiles
(linear interpolation) in milliseconds. Throughput counts inferences, i.e. samples: a batch-8 call
is 8 inferences; it is samples completed divided by the wall-clock time of the timed phase.

Stage timings: GPU runners report host-to-device copy, compute and device-to-host copy per call
(CUDA events); those are summarised separately. CPU runners have no copies, and the report says so
instead of inventing a breakdown.

Synthetic inputs come from :mod:`service.reports.synthetic_inputs`; a batch size the engine cannot
take is skipped with the reason in the result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.backends.base import Runner, ShapeRange, StageTimings, TimedRunner
from service.errors import BadInput, JobCancelled
from service.reports.synthetic_inputs import UNBOUNDED_TENSORS, TensorBudget, synthetic_feeds

MAX_ITERATIONS = 1_000_000
MAX_DURATION_S = 600.0
MAX_WARMUP = 10_000
MAX_CONCURRENCY = 64
MAX_BATCH = 4096
DISTRIBUTION_POINTS = 256  # quantiles kept per batch size for plots
_POLL_S = 0.05
NO_STAGES_CPU = (
    "Stage timings are not available on this backend: it runs on the CPU, where there are no "
    "host-to-device copies to separate from compute; latency is the wall-clock time of each run call."
)
NO_STAGES_RUNNER = "Stage timings are not available: this backend's runner does not report them."


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure. Exactly one of ``iterations`` and ``duration_s`` bounds each batch size."""

    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    iterations: int | None = 100
    duration_s: float | None = None
    concurrency: int = 1
    # Full input shapes for the dynamic non-batch axes (batch axis replaced by each batch size), as
    # chosen by service.reports.benchmark_shapes; sorted by input name.
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def shape_map(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def __post_init__(self) -> None:
        if not self.batch_sizes:
            raise BadInput("batch_sizes must name at least one batch size.")
        if any(not 1 <= b <= MAX_BATCH for b in self.batch_sizes) or len(set(self.batch_sizes)) != len(
            self.batch_sizes
        ):
            raise BadInput(
                f"batch_sizes must be distinct whole numbers from 1 to {MAX_BATCH}, "
                f"got {list(self.batch_sizes)}."
            )
        if (self.iterations is None) == (self.duration_s is None):
            raise BadInput("Give exactly one of iterations and duration_s.")
        if self.iterations is not None and not 1 <= self.iterations <= MAX_ITERATIONS:
            raise BadInput(f"iterations must be from 1 to {MAX_ITERATIONS}, got {self.iterations}.")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise BadInput(
                f"duration_s must be above 0 and at most {MAX_DURATION_S:g}, got {self.duration_s}."
            )
        if not 0 <= self.warmup <= MAX_WARMUP:
            raise BadInput(f"warmup must be from 0 to {MAX_WARMUP}, got {self.warmup}.")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise BadInput(f"concurrency must be from 1 to {MAX_CONCURRENCY}, got {self.concurrency}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "warmup": self.warmup,
            "iterations": self.iterations,
            "duration_s": self.duration_s,
            "concurrency": self.concurrency,
            "shapes": {name: list(dims) for name, dims in self.shapes},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchmarkConfig:
        return cls(
            batch_sizes=tuple(int(b) for b in data.get("batch_sizes", (1,))),
            warmup=int(data.get("warmup", 10)),
            iterations=None if data.get("iterations") is None else int(data["iterations"]),
            duration_s=None if data.get("duration_s") is None else float(data["duration_s"]),
            concurrency=int(data.get("concurrency", 1)),
            shapes=tuple(
                sorted(
                    (str(name), tuple(int(d) for d in dims))
                    for name, dims in (data.get("shapes") or {}).items()
                )
            ),
        )


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency in milliseconds and throughput in inferences (samples) per second."""

    count: int
    min_ms: float
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    throughput: float
    calls_per_s: float

    @classmethod
    def from_samples(
        cls, samples_ns: Sequence[int] | np.ndarray, *, wall_ns: int, batch_size: int
    ) -> LatencyStats:
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        if ms.size == 0:
            raise BadInput("No timed calls completed; nothing to summarise.")
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        calls_per_s = ms.size / (wall_ns / 1e9) if wall_ns > 0 else 0.0
        return cls(
            count=int(ms.size),
            min_ms=float(ms.min()),
            mean_ms=float(ms.mean()),
            std_ms=float(ms.std()),
            p50_ms=float(p50),
            p90_ms=float(p90),
            p95_ms=float(p95),
            p99_ms=float(p99),
            max_ms=float(ms.max()),
            throughput=calls_per_s * batch_size,
            calls_per_s=calls_per_s,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "min": _r(self.min_ms),
            "mean": _r(self.mean_ms),
            "std": _r(self.std_ms),
            "p50": _r(self.p50_ms),
            "p90": _r(self.p90_ms),
            "p95": _r(self.p95_ms),
            "p99": _r(self.p99_ms),
            "max": _r(self.max_ms),
        }

    @classmethod
    def from_dict(cls, latency: Mapping[str, Any], throughput: Mapping[str, Any]) -> LatencyStats:
        return cls(
            count=int(latency["count"]),
            min_ms=latency["min"],
            mean_ms=latency["mean"],
            std_ms=latency["std"],
            p50_ms=latency["p50"],
            p90_ms=latency["p90"],
            p95_ms=latency["p95"],
            p99_ms=latency["p99"],
            max_ms=latency["max"],
            throughput=throughput["inferences_per_s"],
            calls_per_s=throughput["calls_per_s"],
        )


@dataclass(frozen=True)
class StageStats:
    """One stage of a GPU call (h2d, compute or d2h), in milliseconds."""

    mean_ms: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def from_values(cls, values_ms: Sequence[float]) -> StageStats:
        data = np.asarray(values_ms, dtype=np.float64)
        p50, p99 = np.percentile(data, [50, 99])
        return cls(mean_ms=float(data.mean()), p50_ms=float(p50), p99_ms=float(p99))

    def to_dict(self) -> dict[str, float]:
        return {"mean": _r(self.mean_ms), "p50": _r(self.p50_ms), "p99": _r(self.p99_ms)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageStats:
        return cls(mean_ms=data["mean"], p50_ms=data["p50"], p99_ms=data["p99"])


@dataclass(frozen=True)
class StageBreakdown:
    device: str
    h2d: StageStats
    compute: StageStats
    d2h: StageStats

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "h2d": self.h2d.to_dict(),
            "compute": self.compute.to_dict(),
            "d2h": self.d2h.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageBreakdown:
        return cls(
            device=data["device"],
            h2d=StageStats.from_dict(data["h2d"]),
            compute=StageStats.from_dict(data["compute"]),
            d2h=StageStats.from_dict(data["d2h"]),
        )


@dataclass(frozen=True)
class BatchResult:
    """The measurement of one batch size; ``distribution_ms`` are evenly spaced quantiles for plots."""

    batch_size: int
    latency: LatencyStats
    stages: StageBreakdown | None
    distribution_ms: tuple[float, ...]
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "latency_ms": self.latency.to_dict(),
            "throughput": {
                "inferences_per_s": _r(self.latency.throughput),
                "calls_per_s": _r(self.latency.calls_per_s),
            },
            "stage_timings_ms": self.stages.to_dict() if self.stages else None,
            "distribution_ms": list(self.distribution_ms),
            "wall_seconds": _r(self.wall_seconds),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchResult:
        stages = data.get("stage_timings_ms")
        return cls(
            batch_size=int(data["batch_size"]),
            latency=LatencyStats.from_dict(data["latency_ms"], data["throughput"]),
            stages=StageBreakdown.from_dict(stages) if stages else None,
            distribution_ms=tuple(data.get("distribution_ms", ())),
            wall_seconds=float(data.get("wall_seconds", 0.0)),
        )


@dataclass(frozen=True)
class SkippedBatch:
    batch_size: int
    reason: str


@dataclass(frozen=True)
class LatencyMeasurement:
    """Every batch size measured or skipped, and whether stage timings were available."""

    results: tuple[BatchResult, ...]
    skipped: tuple[SkippedBatch, ...]
    stage_note: str  # empty when stage timings were measured


Progress = Callable[[float], None]
StopCheck = Callable[[], bool]


def measure_latency(
    runner: Runner,
    config: BenchmarkConfig,
    *,
    shapes: Mapping[str, ShapeRange] | None = None,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
    budget: TensorBudget = UNBOUNDED_TENSORS,
) -> LatencyMeasurement:
    """Benchmark every batch size of ``config`` on ``runner`` (see the module docstring)."""
    results: list[BatchResult] = []
    skipped: list[SkippedBatch] = []
    stage_note = NO_STAGES_RUNNER if not isinstance(runner, TimedRunner) else ""
    total = len(config.batch_sizes)
    for index, batch_size in enumerate(config.batch_sizes):
        try:
            feeds = synthetic_feeds(
                runner.inputs, batch_size, shapes=shapes, sizes=config.shape_map(), seed=index, budget=budget
            )
        except BadInput as exc:
            skipped.append(SkippedBatch(batch_size, f"batch {batch_size} skipped: {exc.message}"))
            continue

        def report(fraction: float, done: int = index) -> None:
            if progress is not None:
                progress((done + fraction) / total)

        run = _Run(runner, feeds, config, report, should_stop)
        result, has_stages = run.execute(batch_size)
        if not has_stages and not stage_note:
            stage_note = NO_STAGES_CPU
        results.append(result)
    return LatencyMeasurement(results=tuple(results), skipped=tuple(skipped), stage_note=stage_note)


class _Run:
    """One batch size: warm-up, then timed calls on ``concurrency`` threads, watched by the caller."""

    def __init__(
        self,
        runner: Runner,
        feeds: dict[str, np.ndarray],
        config: BenchmarkConfig,
        report: Progress,
        should_stop: StopCheck | None,
    ) -> None:
        self.runner = runner
        self.feeds = feeds
        self.config = config
        self.report = report
        self.should_stop = should_stop or (lambda: False)
        self.timed_call = runner.infer_timed if isinstance(runner, TimedRunner) else None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.running = 0
        self.started = 0
        self.samples: list[int] = []
        self.stages: list[StageTimings] = []
        self.errors: list[BaseException] = []
        self.deadline_ns = 0
        self.opened_ns: int | None = None
        # The timed phase runs from the gate opening (every worker ready) to the last worker's last
        # return, so neither thread start-up nor the coordinator's polling interval counts as busy time.
        self.gate = threading.Barrier(config.concurrency, action=self.open_gate)
        self.first_start_ns: int | None = None
        self.last_end_ns = 0

    def call(self) -> StageTimings | None:
        if self.timed_call is not None:
            return self.timed_call(self.feeds)[1]
        self.runner.infer(self.feeds)
        return None

    def execute(self, batch_size: int) -> tuple[BatchResult, bool]:
        for _ in range(self.config.warmup):
            if self.should_stop():
                raise JobCancelled("The benchmark was stopped during warm-up.")
            self.call()
        self.running = self.config.concurrency
        begin = time.perf_counter_ns()
        for index in range(self.config.concurrency):
            threading.Thread(target=self.work, name=f"benchmark-{index}", daemon=True).start()
        cancelled = False
        while not self.finished.wait(_POLL_S):
            if not cancelled and self.should_stop():
                cancelled = True
                self.stop.set()
            self.report(self.fraction())
        wall_ns = self.last_end_ns - (self.first_start_ns or begin)
        if self.errors:
            raise self.errors[0]
        if cancelled:
            raise JobCancelled("The benchmark was stopped before it finished.")
        self.report(1.0)
        measured_stages = [s for s in self.stages if s.device != "cpu"]
        stages = _stage_breakdown(measured_stages) if measured_stages else None
        ms = np.asarray(self.samples, dtype=np.float64) / 1e6
        points = min(DISTRIBUTION_POINTS, ms.size)
        distribution = tuple(_r(v) for v in np.quantile(ms, np.linspace(0.0, 1.0, points)))
        latency = LatencyStats.from_samples(self.samples, wall_ns=wall_ns, batch_size=batch_size)
        return BatchResult(batch_size, latency, stages, distribution, wall_ns / 1e9), stages is not None

    def open_gate(self) -> None:
        """Runs once, when every worker is ready: the duration starts counting now."""
        self.opened_ns = time.perf_counter_ns()
        if self.config.duration_s is not None:
            self.deadline_ns = self.opened_ns + int(self.config.duration_s * 1e9)

    def claim(self) -> bool:
        with self.lock:
            if self.stop.is_set():
                return False
            if self.config.iterations is not None:
                if self.started >= self.config.iterations:
                    return False
            # In duration mode the first call always runs, so a tiny duration still yields a sample.
            elif self.started and (
                self.started >= MAX_ITERATIONS or time.perf_counter_ns() >= self.deadline_ns
            ):
                return False
            self.started += 1
            return True

    def work(self) -> None:
        samples: list[int] = []
        stages: list[StageTimings] = []
        self.gate.wait()
        # Wall time counts from the gate opening, the instant the duration starts, so a duration-bound
        # run never reports less wall time than it was asked to run.
        begun = self.opened_ns if self.opened_ns is not None else time.perf_counter_ns()
        try:
            while self.claim():
                start = time.perf_counter_ns()
                timing = self.call()
                samples.append(time.perf_counter_ns() - start)
                if timing is not None:
                    stages.append(timing)
        except BaseException as exc:  # handed to the coordinating thread, which re-raises it
            self.stop.set()
            with self.lock:
                self.errors.append(exc)
        ended = time.perf_counter_ns()
        with self.lock:
            self.samples.extend(samples)
            self.stages.extend(stages)
            self.first_start_ns = begun if self.first_start_ns is None else min(self.first_start_ns, begun)
            self.last_end_ns = max(self.last_end_ns, ended)
            self.running -= 1
            if self.running == 0:
                self.finished.set()

    def fraction(self) -> float:
        if self.config.iterations is not None:
            return min(self.started / self.config.iterations, 1.0)
        if not self.deadline_ns:
            return 0.0  # the workers have not started yet
        remaining = max(self.deadline_ns - time.perf_counter_ns(), 0)
        return 1.0 - remaining / ((self.config.duration_s or 1.0) * 1e9)


def _stage_breakdown(stages: Sequence[StageTimings]) -> StageBreakdown:
    return StageBreakdown(
        device=stages[0].device,
        h2d=StageStats.from_values([s.h2d_ms for s in stages]),
        compute=StageStats.from_values([s.compute_ms for s in stages]),
        d2h=StageStats.from_values([s.d2h_ms for s in stages]),
    )


def _r(value: float) -> float:
    """Round for reports: microsecond resolution on milliseconds is all a timer this coarse can claim."""
    return round(float(value), 4)
