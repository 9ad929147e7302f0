"""Several engines of one model side by side: latency, throughput, speedup over FP32, accuracy, size.

``compare_engines(entries)`` turns per-engine measurements (a :class:`BenchmarkReport` where the engine
ran here, the reason where it could not) and accuracy evidence into one :class:`ComparisonReport`.

* Speedup is the FP32 baseline's p50 latency divided by the engine's p50, per batch size. The baseline
  is the first measured FP32 engine in the request; without one, speedups are left out and a note
  says why. A speedup across different devices or backends is flagged in the notes: it compares
  hardware as much as precision.
* Accuracy comes, in order of preference, from an evaluation run for this comparison or an earlier
  evaluation report of the engine, else from the check the build ran (``report["accuracy"]`` of the
  engine record: ONNX Runtime on the Q/DQ model against FP32, on held-out samples). Each row says
  which. The summary keeps the worst value over the outputs: lowest cosine, SNR and top-1 agreement,
  largest absolute error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.catalog.engines import EngineRecord
from service.errors import BadInput
from service.reports.benchmark import BenchmarkReport
from service.store.clock import utc_now

COMPARISON_KIND = "comparison"
MAX_ENGINES = 8


@dataclass(frozen=True)
class AccuracySummary:
    """The worst per-output accuracy figures of one engine, and where they came from."""

    source: str
    min_cosine: float | None = None
    max_abs_error: float | None = None
    min_snr_db: float | None = None
    min_top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "min_cosine": self.min_cosine,
            "max_abs_error": self.max_abs_error,
            "min_snr_db": self.min_snr_db,
            "min_top1_agreement": self.min_top1_agreement,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracySummary:
        return cls(
            source=data["source"],
            min_cosine=data.get("min_cosine"),
            max_abs_error=data.get("max_abs_error"),
            min_snr_db=data.get("min_snr_db"),
            min_top1_agreement=data.get("min_top1_agreement"),
        )


def summarize_accuracy(accuracy: Mapping[str, Any], source: str) -> AccuracySummary:
    """Worst values of an accuracy report, found by metric name wherever they sit in its nesting."""
    found: dict[str, list[float]] = {"cosine": [], "max_abs": [], "snr": [], "top1": []}

    def visit(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                metric = _metric(str(key))
                if metric is not None and isinstance(value, int | float) and not isinstance(value, bool):
                    if math.isfinite(value):
                        found[metric].append(float(value))
                else:
                    visit(value)
        elif isinstance(node, list | tuple):
            for item in node:
                visit(item)

    visit(accuracy)
    return AccuracySummary(
        source=source,
        min_cosine=min(found["cosine"], default=None),
        max_abs_error=max(found["max_abs"], default=None),
        min_snr_db=min(found["snr"], default=None),
        min_top1_agreement=min(found["top1"], default=None),
    )


def _metric(key: str) -> str | None:
    key = key.lower()
    for prefix in ("min_", "mean_", "worst_"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    if key in ("cosine", "cosine_similarity"):
        return "cosine"
    if key in ("max_abs_error", "max_abs_err", "max_abs_diff"):
        return "max_abs"
    if key in ("snr_db", "snr"):
        return "snr"
    if key in ("top1_agreement", "top_1_agreement", "top1"):
        return "top1"
    return None


@dataclass(frozen=True)
class ComparisonEntry:
    """What the comparison job gathered for one engine."""

    record: EngineRecord
    benchmark: BenchmarkReport | None
    not_run: str = ""
    accuracy: AccuracySummary | None = None


@dataclass(frozen=True)
class ComparisonRow:
    engine_id: str
    precision: str
    backend: str
    device: str  # where it was measured; the build device when it could not run here
    engine_bytes: int
    benchmark: BenchmarkReport | None
    not_run: str
    accuracy: AccuracySummary | None
    speedup: tuple[tuple[int, float], ...]  # (batch size, baseline p50 / this p50)

    @property
    def label(self) -> str:
        return f"{self.precision.upper()} {self.backend} {self.engine_id[:8]}"

    def speedup_at(self, batch_size: int) -> float | None:
        return dict(self.speedup).get(batch_size)

    def to_dict(self) -> dict[str, Any]:
        latency: dict[str, Any] = {}
        if self.benchmark is not None:
            for result in self.benchmark.results:
                latency[str(result.batch_size)] = {
                    "p50": result.latency.to_dict()["p50"],
                    "p99": result.latency.to_dict()["p99"],
                    "inferences_per_s": round(result.latency.throughput, 4),
                }
        return {
            "engine_id": self.engine_id,
            "precision": self.precision,
            "backend": self.backend,
            "device": self.device,
            "engine_bytes": self.engine_bytes,
            "measured": self.benchmark is not None,
            "not_run_reason": self.not_run or None,
            "latency_ms": latency,
            "speedup_vs_fp32": {str(batch): round(value, 4) for batch, value in self.speedup},
            "accuracy": self.accuracy.to_dict() if self.accuracy else None,
            "benchmark": self.benchmark.to_dict() if self.benchmark else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonRow:
        return cls(
            engine_id=data["engine_id"],
            precision=data["precision"],
            backend=data["backend"],
            device=data["device"],
            engine_bytes=int(data["engine_bytes"]),
            benchmark=BenchmarkReport.from_dict(data["benchmark"]) if data.get("benchmark") else None,
            not_run=data.get("not_run_reason") or "",
            accuracy=AccuracySummary.from_dict(data["accuracy"]) if data.get("accuracy") else None,
            speedup=tuple((int(b), float(v)) for b, v in data.get("speedup_vs_fp32", {}).items()),
        )


@dataclass(frozen=True)
class ComparisonReport:
    model_id: str
    baseline_engine_id: str | None
    batch_sizes: tuple[int, ...]
    rows: tuple[ComparisonRow, ...]
    notes: tuple[str, ...]
    measured_on: str
    measured_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": COMPARISON_KIND,
            "summary": self.measured_on,
            "model_id": self.model_id,
            "baseline_engine_id": self.baseline_engine_id,
            "batch_sizes": list(self.batch_sizes),
            "engines": [row.to_dict() for row in self.rows],
            "notes": list(self.notes),
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComparisonReport:
        return cls(
            model_id=data["model_id"],
            baseline_engine_id=data.get("baseline_engine_id"),
            batch_sizes=tuple(int(b) for b in data["batch_sizes"]),
            rows=tuple(ComparisonRow.from_dict(r) for r in data["engines"]),
            notes=tuple(data.get("notes", ())),
            measured_on=data["summary"],
            measured_at=data["measured_at"],
        )


def check_comparable(records: Sequence[EngineRecord], roots: Mapping[str, str]) -> str:
    """The shared root model id of ``records`` (``roots``: model id -> its FP32 ancestor), or BadInput."""
    if not 2 <= len(records) <= MAX_ENGINES:
        raise BadInput(f"Compare from 2 to {MAX_ENGINES} engines; {len(records)} were given.")
    if len({r.id for r in records}) != len(records):
        raise BadInput("An engine id is listed more than once; list each engine once.")
    by_root: dict[str, list[str]] = {}
    for record in records:
        by_root.setdefault(roots.get(record.model_id, record.model_id), []).append(record.id)
    if len(by_root) != 1:
        groups = "; ".join(
            f"model {root[:12]}: {', '.join(i[:12] for i in ids)}" for root, ids in by_root.items()
        )
        raise BadInput(f"The engines are of different models ({groups}); compare engines of one model.")
    return next(iter(by_root))


def compare_engines(
    model_id: str, entries: Sequence[ComparisonEntry], batch_sizes: Sequence[int]
) -> ComparisonReport:
    """Rows in request order, speedups against the first measured FP32 engine, and notes."""
    notes: list[str] = []
    baseline = next(
        (
            e
            for e in entries
            if e.record.precision == "fp32" and e.benchmark is not None and e.benchmark.results
        ),
        None,
    )
    if baseline is None:
        notes.append(
            "No FP32 engine was measured, so there is no baseline for speedups; add one to the request."
        )
    rows = []
    for entry in entries:
        speedup: tuple[tuple[int, float], ...] = ()
        if baseline is not None and baseline.benchmark is not None and entry.benchmark is not None:
            speedup = _speedups(baseline.benchmark, entry.benchmark)
            base_engine, engine = baseline.benchmark.engine, entry.benchmark.engine
            if (base_engine.device, base_engine.backend) != (engine.device, engine.backend):
                notes.append(
                    f"Engine {entry.record.id[:12]} ran on {engine.device} with {engine.backend}, the FP32 "
                    f"baseline on {base_engine.device} with {base_engine.backend}: its speedup compares "
                    "hardware and backends, not only precision."
                )
        if entry.not_run:
            notes.append(f"Engine {entry.record.id[:12]} was not measured: {entry.not_run}")
        rows.append(
            ComparisonRow(
                engine_id=entry.record.id,
                precision=entry.record.precision,
                backend=entry.record.backend,
                device=entry.benchmark.engine.device if entry.benchmark else entry.record.device,
                engine_bytes=entry.record.size_bytes,
                benchmark=entry.benchmark,
                not_run=entry.not_run,
                accuracy=entry.accuracy,
                speedup=speedup,
            )
        )
    return ComparisonReport(
        model_id=model_id,
        baseline_engine_id=baseline.record.id if baseline else None,
        batch_sizes=tuple(batch_sizes),
        rows=tuple(rows),
        notes=tuple(notes),
        measured_on=_measured_on(rows),
        measured_at=utc_now(),
    )


def _speedups(baseline: BenchmarkReport, other: BenchmarkReport) -> tuple[tuple[int, float], ...]:
    pairs = []
    for result in other.results:
        base = baseline.result_for(result.batch_size)
        if base is not None and result.latency.p50_ms > 0:
            pairs.append((result.batch_size, base.latency.p50_ms / result.latency.p50_ms))
    return tuple(pairs)


def _measured_on(rows: Sequence[ComparisonRow]) -> str:
    places = sorted({b.engine.measured_on for r in rows if (b := r.benchmark) is not None})
    if not places:
        return "no engine could be measured on this host"
    if len(places) == 1:
        return places[0]
    return "engines measured in different places: " + "; ".join(places)
