"""Benchmark reports for report tests: measured for real on ONNX Runtime, or written out by hand."""

from __future__ import annotations

from pathlib import Path

from service.backends.base import BackendInfo
from service.backends.registry import get_backend
from service.catalog.engine_keys import BuildConfig
from service.catalog.engines import EngineRecord
from service.reports.benchmark import BenchmarkReport, HostInfo, MeasuredEngine, benchmark_runner
from service.reports.latency import (
    BatchResult,
    BenchmarkConfig,
    LatencyMeasurement,
    LatencyStats,
    SkippedBatch,
)
from service.serving.runner_pool import RunnerPool
from tests.model_factory import resnet_block_classifier
from tests.serving.engines import build_engine, open_stores


def measured_report(root: Path, *, batch_sizes: tuple[int, ...] = (1, 4), seed: int = 0) -> BenchmarkReport:
    """A real benchmark of a small ONNX Runtime engine (a few iterations)."""
    stores = open_stores(root)
    record = build_engine(stores, resnet_block_classifier(seed=seed))
    pool = RunnerPool(stores.engines, budget_bytes=1 << 30)
    config = BenchmarkConfig(batch_sizes=batch_sizes, warmup=2, iterations=20)
    with pool.lease(record.id) as runner:
        report = benchmark_runner(record, get_backend("onnxruntime").describe(), runner, config)
    pool.close()
    return report


def engine_record(
    engine_id: str,
    precision: str,
    *,
    model_id: str = "m" * 64,
    backend: str = "onnxruntime",
    size: int = 1000,
    report: dict[str, object] | None = None,
) -> EngineRecord:
    return EngineRecord(
        id=engine_id,
        model_id=model_id,
        built_model_id=model_id,
        calibration_set_id=None,
        backend=backend,
        backend_version="1.0",
        device="CPU (test)",
        precision=precision,
        build_config=BuildConfig(precision=precision),  # type: ignore[arg-type]
        plan_sha256="0" * 64,
        size_bytes=size,
        file_extension=".onnx",
        build_seconds=1.0,
        report=report or {},
        calibration_cache_sha256=None,
        created_at="2026-01-01T00:00:00",
        last_used_at="2026-01-01T00:00:00",
    )


def written_report(
    record: EngineRecord,
    p50_by_batch: dict[int, float],
    *,
    device: str = "CPU (test)",
    skipped: tuple[SkippedBatch, ...] = (),
    stage_note: str = "no stages on the CPU",
) -> BenchmarkReport:
    """A report with the given p50 per batch size (other statistics derived from it)."""
    results = tuple(
        BatchResult(
            batch_size=batch,
            latency=LatencyStats(
                count=10,
                min_ms=p50 * 0.9,
                mean_ms=p50,
                std_ms=p50 * 0.05,
                p50_ms=p50,
                p90_ms=p50 * 1.1,
                p95_ms=p50 * 1.15,
                p99_ms=p50 * 1.2,
                max_ms=p50 * 1.3,
                throughput=1000.0 * batch / p50,
                calls_per_s=1000.0 / p50,
            ),
            stages=None,
            distribution_ms=(p50 * 0.9, p50, p50 * 1.3),
            wall_seconds=0.01,
        )
        for batch, p50 in p50_by_batch.items()
    )
    runtime = BackendInfo(name=record.backend, version="1.0", device=device)
    return BenchmarkReport(
        engine=MeasuredEngine.from_record(record, runtime),
        config=BenchmarkConfig(batch_sizes=tuple(p50_by_batch) or (1,), warmup=0, iterations=10),
        measurement=LatencyMeasurement(results=results, skipped=skipped, stage_note=stage_note),
        host=HostInfo(cpu="test cpu", cores=2, platform="test", python="3.11"),
        measured_at="2026-01-01T00:00:00",
    )
