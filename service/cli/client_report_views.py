"""Human-readable views of job and report documents: job states, latency, quantization, inference outputs.

Contract: like :mod:`service.cli.client_views`, each function takes what the API returned (or the
client's :class:`~service.cli.client_api.JobState`, or output arrays) and gives renderables for
:meth:`service.cli.render.Output.show`, without calling the server or printing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from service.cli.client_views import accuracy_views, cell, details, flatten, make_table, records_table

if TYPE_CHECKING:
    from rich.table import Table

    from service.cli.client_api import Document, JobState


def jobs_table(title: str, jobs: Sequence[JobState]) -> Table:
    rows = [
        (j.id, j.status, j.phase, f"{j.progress:.0%}", j.document.get("created_at"), j.error) for j in jobs
    ]
    return make_table(title, ("id", "status", "phase", "progress", "created", "error"), rows)


def job_views(state: JobState, title: str) -> list[Table]:
    fields = {
        "id": state.id,
        "kind": state.kind,
        "status": state.status,
        "phase": state.phase,
        "progress": f"{state.progress:.0%}",
        "error": state.error,
        "created": state.document.get("created_at"),
        "finished": state.document.get("finished_at"),
    }
    if state.result:
        fields.update(
            {
                f"result.{key}": value
                for key, value in flatten(state.result).items()
                if not isinstance(value, list) or len(value) <= 8
            }
        )
    views = [details(title, fields)]
    if state.log_tail:
        views.append(make_table("Log (last lines)", ("line",), [(line,) for line in state.log_tail[-10:]]))
    return views


def benchmark_table(report: Document) -> list[Table]:
    """Latency percentiles and throughput per batch size, captioned with where they were measured."""
    rows = []
    for result in report.get("results", []):
        latency = result.get("latency_ms") or {}
        throughput = result.get("throughput") or {}
        rows.append(
            (
                result.get("batch_size"),
                latency.get("p50"),
                latency.get("p90"),
                latency.get("p95"),
                latency.get("p99"),
                latency.get("mean"),
                throughput.get("inferences_per_s"),
                latency.get("count"),
            )
        )
    measured = report.get("measured_on") or {}
    engine = report.get("engine") or {}
    host = measured.get("host") or {}
    caption = (
        f"engine {cell(engine.get('engine_id'))} ({cell(engine.get('precision'))}); measured on "
        f"{cell(measured.get('device'))} with {cell(measured.get('backend'))} "
        f"{cell(measured.get('backend_version'))}; host {cell(host.get('cpu'))}, "
        f"{cell(host.get('cores'))} cores"
    )
    conditions = report.get("conditions") or {}
    load = conditions.get("load_average_start")
    if conditions:
        alone = "alone on the host" if conditions.get("exclusive") else "not alone on the host"
        caption += f"; ran {alone}, load average {cell(load[0] if load else None)}"
        if conditions.get("warning"):
            caption += f"; WARNING: {conditions['warning']}"
    shapes = (report.get("config") or {}).get("shapes") or {}
    if shapes:
        caption += "; shapes " + ", ".join(f"{n}={'x'.join(map(str, d))}" for n, d in shapes.items())
    columns = ("batch", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "inferences/s", "calls")
    views = [make_table("Latency", columns, rows, caption)]
    skipped = report.get("skipped") or []
    if skipped:
        views.append(
            make_table(
                "Skipped batch sizes",
                ("batch", "reason"),
                [(s.get("batch_size"), s.get("reason")) for s in skipped],
            )
        )
    return views


def evaluation_views(report: Document) -> list[Table]:
    """Where the evaluation ran and on what, then the accuracy numbers against the FP32 reference."""
    engine = report.get("engine") or {}
    reference = report.get("reference") or {}
    fields = {
        "engine": engine.get("engine_id"),
        "precision": engine.get("precision"),
        "backend": engine.get("backend"),
        "measured on": report.get("summary"),
        "reference": reference.get("description"),
        "set": report.get("eval_set_id"),
        "samples": report.get("samples"),
    }
    return [details("Evaluation", fields), *accuracy_views(report.get("accuracy") or {}, "Accuracy vs FP32")]


def comparison_table(report: Document) -> list[Table]:
    """One row per engine and batch size: latency, throughput, speedup against FP32, worst accuracy."""
    rows = []
    for engine in report.get("engines", []):
        accuracy = engine.get("accuracy") or {}
        latency = engine.get("latency_ms") or {}
        speedup = engine.get("speedup_vs_fp32") or {}
        measured = latency.items() if latency else [(None, {})]
        for batch, numbers in measured:
            rows.append(
                (
                    cell(engine.get("engine_id"))[:16],
                    engine.get("precision"),
                    engine.get("backend"),
                    batch,
                    numbers.get("p50"),
                    numbers.get("p99"),
                    numbers.get("inferences_per_s"),
                    speedup.get(batch) if batch is not None else None,
                    accuracy.get("min_cosine"),
                    accuracy.get("min_top1_agreement"),
                    engine.get("not_run_reason"),
                )
            )
    columns = (
        "engine",
        "precision",
        "backend",
        "batch",
        "p50 ms",
        "p99 ms",
        "inferences/s",
        "speedup",
        "min cosine",
        "top-1 agreement",
        "not measured",
    )
    views = [make_table("Comparison", columns, rows, cell(report.get("summary")))]
    notes = report.get("notes") or []
    if notes:
        views.append(make_table("Notes", ("note",), [(note,) for note in notes]))
    return views


def report_views(state: JobState) -> list[Table]:
    """A finished report as its own table (by its kind); a report still running as its job state."""
    result = state.result or {}
    if state.status != "succeeded" or not result:
        return job_views(state, "Report")
    if result.get("kind") == "evaluation":
        return evaluation_views(result)
    if result.get("kind") == "comparison":
        return comparison_table(result)
    if "results" in result:
        return benchmark_table(result)
    return job_views(state, "Report")


def quantization_views(state: JobState) -> list[Table]:
    result = state.result or {}
    fields = {
        "job": state.id,
        "Q/DQ model": result.get("qdq_model_id"),
        "method": result.get("method"),
        "calibrated tensors": result.get("calibrated_tensors"),
        "quantized nodes": result.get("quantized_nodes"),
        "kept layers": result.get("kept_layers"),
        "calibration samples": result.get("calibration_samples"),
        "held-out samples": result.get("holdout_samples"),
    }
    views = [details("Quantization", fields)]
    accuracy = result.get("accuracy")
    if isinstance(accuracy, dict):
        views.extend(accuracy_views(accuracy, "Accuracy vs FP32 (held-out samples)"))
    methods = result.get("method_accuracy")
    if isinstance(methods, dict) and methods:
        views.append(records_table("Accuracy by calibration method", "method", methods))
    sensitivity = result.get("sensitivity")
    if isinstance(sensitivity, list) and sensitivity:
        columns = list(dict.fromkeys(key for entry in sensitivity for key in entry))
        views.append(
            make_table(
                "Layer sensitivity (most sensitive first)",
                columns,
                [[entry.get(c) for c in columns] for entry in sensitivity],
            )
        )
    return views


def outputs_table(outputs: Mapping[str, Any]) -> Table:
    """Inference outputs: name, dtype, shape and value statistics (arrays are numpy arrays)."""
    rows = []
    for name, array in outputs.items():
        finite = array[array == array] if array.dtype.kind == "f" else array
        stats = (finite.min(), finite.max(), finite.mean()) if finite.size else (None, None, None)
        values = array.ravel().tolist() if array.size <= 10 else None
        shape = "[" + ", ".join(map(str, array.shape)) + "]"
        rows.append((name, array.dtype.name, shape, *(_number(v) for v in stats), values))
    return make_table("Outputs", ("name", "dtype", "shape", "min", "max", "mean", "values"), rows)


def _number(value: Any) -> Any:
    return None if value is None else float(value)
