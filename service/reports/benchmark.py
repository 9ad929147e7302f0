"""The benchmark report: which engine was measured, where, how, and the latency it showed.

A :class:`BenchmarkReport` is what the ``benchmark`` job stores as its result (``to_dict``) and what
the HTML page and the plot are drawn from (``from_dict``), so a report renders the same whenever it
is fetched. ``measured_on`` is the device the runner actually ran on (the backend's device on this
host), never the device an ahead-of-time engine was built on, and every rendering names it.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.backends.base import BackendInfo, Runner, ShapeRange
from service.catalog.engines import EngineRecord
from service.reports.latency import (
    BatchResult,
    BenchmarkConfig,
    LatencyMeasurement,
    Progress,
    SkippedBatch,
    StopCheck,
    measure_latency,
)
from service.reports.run_conditions import ConditionsWatch, RunConditions
from service.reports.synthetic_inputs import UNBOUNDED_TENSORS, TensorBudget
from service.store.clock import utc_now

BENCHMARK_KIND = "benchmark"


@dataclass(frozen=True)
class HostInfo:
    """The machine a benchmark ran on."""

    cpu: str
    cores: int
    platform: str
    python: str

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu, "cores": self.cores, "platform": self.platform, "python": self.python}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HostInfo:
        return cls(
            cpu=data["cpu"], cores=int(data["cores"]), platform=data["platform"], python=data["python"]
        )


def host_info() -> HostInfo:
    """CPU model (from /proc/cpuinfo on Linux), usable cores, OS and Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # not Linux: keep platform's answer
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return HostInfo(
        cpu=cpu, cores=cores, platform=platform.platform(terse=True), python=platform.python_version()
    )


@dataclass(frozen=True)
class MeasuredEngine:
    """The engine a report is about, and the backend and device that ran it here."""

    engine_id: str
    model_id: str
    precision: str
    backend: str
    backend_version: str
    device: str  # where it ran for this report
    built_on: str  # the device recorded at build time (may be "ahead-of-time (no GPU)")
    engine_bytes: int

    @classmethod
    def from_record(cls, record: EngineRecord, runtime: BackendInfo) -> MeasuredEngine:
        return cls(
            engine_id=record.id,
            model_id=record.model_id,
            precision=record.precision,
            backend=record.backend,
            backend_version=runtime.version,
            device=runtime.device,
            built_on=record.device,
            engine_bytes=record.size_bytes,
        )

    @property
    def measured_on(self) -> str:
        """The sentence every rendering carries: where and with what the numbers were measured."""
        return f"measured on {self.device} with {self.backend} {self.backend_version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "model_id": self.model_id,
            "precision": self.precision,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "device": self.device,
            "built_on": self.built_on,
            "engine_bytes": self.engine_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MeasuredEngine:
        return cls(
            engine_id=data["engine_id"],
            model_id=data["model_id"],
            precision=data["precision"],
            backend=data["backend"],
            backend_version=data["backend_version"],
            device=data["device"],
            built_on=data["built_on"],
            engine_bytes=int(data["engine_bytes"]),
        )


@dataclass(frozen=True)
class BenchmarkReport:
    engine: MeasuredEngine
    config: BenchmarkConfig
    measurement: LatencyMeasurement
    host: HostInfo
    measured_at: str
    conditions: RunConditions | None = None  # None in reports stored before conditions were recorded

    @property
    def results(self) -> tuple[BatchResult, ...]:
        return self.measurement.results

    def result_for(self, batch_size: int) -> BatchResult | None:
        return next((r for r in self.measurement.results if r.batch_size == batch_size), None)

    def to_dict(self) -> dict[str, Any]:
        note = self.measurement.stage_note
        return {
            "kind": BENCHMARK_KIND,
            "summary": self.engine.measured_on,
            "engine": self.engine.to_dict(),
            "measured_on": {
                "device": self.engine.device,
                "backend": self.engine.backend,
                "backend_version": self.engine.backend_version,
                "host": self.host.to_dict(),
            },
            "config": self.config.to_dict(),
            "results": [result.to_dict() for result in self.measurement.results],
            "skipped": [{"batch_size": s.batch_size, "reason": s.reason} for s in self.measurement.skipped],
            "stage_timings": {"available": not note, "note": note},
            "measured_at": self.measured_at,
            "conditions": self.conditions.to_dict() if self.conditions else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchmarkReport:
        measurement = LatencyMeasurement(
            results=tuple(BatchResult.from_dict(r) for r in data["results"]),
            skipped=tuple(SkippedBatch(int(s["batch_size"]), s["reason"]) for s in data.get("skipped", ())),
            stage_note=data.get("stage_timings", {}).get("note", ""),
        )
        return cls(
            engine=MeasuredEngine.from_dict(data["engine"]),
            config=BenchmarkConfig.from_dict(data["config"]),
            measurement=measurement,
            host=HostInfo.from_dict(data["measured_on"]["host"]),
            measured_at=data["measured_at"],
            conditions=RunConditions.from_dict(data["conditions"]) if data.get("conditions") else None,
        )


def benchmark_runner(
    record: EngineRecord,
    runtime: BackendInfo,
    runner: Runner,
    config: BenchmarkConfig,
    *,
    progress: Progress | None = None,
    should_stop: StopCheck | None = None,
    budget: TensorBudget = UNBOUNDED_TENSORS,
    watch: ConditionsWatch | None = None,
) -> BenchmarkReport:
    """Measure ``runner`` (the loaded ``record``) and wrap the numbers with what was measured where.

    ``watch`` samples the host around the measurement (load average, other running jobs); without
    one, the report still records the load average and says the run did not hold the host alone.
    """
    shapes: Mapping[str, ShapeRange] = record.build_config.shape_map()
    watch = watch or ConditionsWatch()
    watch.begin()
    measurement = measure_latency(
        runner, config, shapes=shapes, progress=progress, should_stop=should_stop, budget=budget
    )
    return BenchmarkReport(
        engine=MeasuredEngine.from_record(record, runtime),
        config=config,
        measurement=measurement,
        host=host_info(),
        measured_at=utc_now(),
        conditions=watch.end(),
    )
