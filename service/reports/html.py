"""Self-contained HTML pages for reports: benchmark, engine comparison and accuracy evaluation.

Each page is one document with inline CSS and its plot embedded as a base64 PNG, so it can be saved
or mailed as a single file. The backend and the device that produced the numbers sit in a banner at
the top ("measured on <device> with <backend>"); a CPU measurement says in so many words that it is
not a GPU result. Every piece of text that comes from data (ids, names, messages, device strings) is
escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from service.backends.capabilities import capabilities_of

if TYPE_CHECKING:
    from service.reports.benchmark import BenchmarkReport, MeasuredEngine
    from service.reports.comparison import ComparisonReport
    from service.reports.evaluation import EvaluationReport

Cell = str | int | float | None

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:70rem;color:#1b1b1b;
padding:0 1rem}
h1{font-size:1.5rem;margin-bottom:.25rem}h2{font-size:1.15rem;margin-top:2rem}
.banner{padding:.8rem 1rem;border-radius:.4rem;font-size:1.05rem;margin:1rem 0;border:1px solid}
.banner.cpu{background:#fff6e0;border-color:#e0b44c}.banner.gpu{background:#e8f4ea;border-color:#6aa874}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}th{background:#f2f2f2}
td.text,th.text{text-align:left}.note{color:#555;font-size:.92rem}img{max-width:100%;height:auto}
code{background:#f4f4f4;padding:0 .2rem}
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _cell(value: Cell, digits: int = 3) -> str:
    if value is None:
        return '<td class="text">-</td>'
    if isinstance(value, float):
        return f"<td>{value:.{digits}f}</td>"
    if isinstance(value, int):
        return f"<td>{value}</td>"
    return f'<td class="text">{_e(value)}</td>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """An HTML table; numbers right-aligned with three decimals, text escaped and left-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def is_cpu_measurement(backend: str, device: str) -> bool:
    return capabilities_of(backend).runs_on_cpu or device.strip().lower().startswith("cpu")


def banner(backend: str, backend_version: str, device: str) -> str:
    """The prominent 'measured on <device> with <backend>' line, with a CPU disclaimer where it applies."""
    text = (
        f"Measured on <strong>{_e(device)}</strong> with "
        f"<strong>{_e(backend)} {_e(backend_version)}</strong>."
    )
    if is_cpu_measurement(backend, device):
        return (
            f'<div class="banner cpu">{text} This is a CPU measurement: it says nothing about GPU latency '
            "or throughput.</div>"
        )
    return f'<div class="banner gpu">{text}</div>'


def image(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    encoded = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{encoded}"></p>'


def page(title: str, body: Sequence[str]) -> str:
    """A complete, self-contained HTML document (``title`` is escaped; ``body`` parts are HTML)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1>{''.join(body)}</body></html>\n"
    )


def engine_table(engine: MeasuredEngine) -> str:
    rows: list[Sequence[Cell]] = [
        ("engine id", engine.engine_id),
        ("model id", engine.model_id),
        ("precision", engine.precision),
        ("backend", f"{engine.backend} {engine.backend_version}"),
        ("ran on", engine.device),
        ("built on", engine.built_on),
        ("engine size (bytes)", engine.engine_bytes),
    ]
    return table(("", ""), rows)


def conditions_note(report: BenchmarkReport) -> str:
    """What else the host did during the measurement (load average, other jobs), with any warning."""
    conditions = report.conditions
    if conditions is None:
        return '<p class="note">Host conditions were not recorded for this report.</p>'
    load = conditions.load_average_start, conditions.load_average_end
    loads = " -> ".join(f"{value[0]:g}" for value in load if value) or "not available"
    alone = "alone among the service's jobs" if conditions.exclusive else "alongside other jobs"
    text = (
        f"Ran {alone} (waited {conditions.waited_s:.1f} s for the host); 1-minute load average {loads} "
        f"on {conditions.cores} cores; other running jobs: {_e(', '.join(conditions.other_jobs) or 'none')}."
    )
    if conditions.warning:
        text += f" <strong>Latency may be distorted: {_e(conditions.warning)}.</strong>"
    return f'<p class="note">{text}</p>'


def benchmark_html(report: BenchmarkReport, png: bytes | None) -> str:
    """The benchmark page: banner, engine, latency and throughput per batch size, stages, plot."""
    engine = report.engine
    body = [banner(engine.backend, engine.backend_version, engine.device), engine_table(engine)]
    config = report.config
    bound = f"{config.iterations} iterations" if config.iterations else f"{config.duration_s:g} s"
    body.append(
        f'<p class="note">{config.warmup} warm-up calls, then {_e(bound)} per batch size on '
        f"{config.concurrency} thread(s) sharing one runner; measured at {_e(report.measured_at)} on a "
        f"{_e(report.host.cpu)} host ({report.host.cores} cores, Python {_e(report.host.python)}).</p>"
    )
    body.append(conditions_note(report))
    body.append("<h2>Latency per call (ms) and throughput</h2>")
    headers = ("batch", "calls", "min", "mean", "std", "p50", "p90", "p95", "p99", "max", "inferences/s")
    rows = [
        (
            r.batch_size,
            r.latency.count,
            r.latency.min_ms,
            r.latency.mean_ms,
            r.latency.std_ms,
            r.latency.p50_ms,
            r.latency.p90_ms,
            r.latency.p95_ms,
            r.latency.p99_ms,
            r.latency.max_ms,
            r.latency.throughput,
        )
        for r in report.results
    ]
    body.append(table(headers, rows))
    for skipped in report.measurement.skipped:
        body.append(f'<p class="note">{_e(skipped.reason)}</p>')
    body.append("<h2>Stage timings</h2>")
    staged = [r for r in report.results if r.stages is not None]
    if staged:
        stage_rows = [
            (
                r.batch_size,
                s.h2d.p50_ms,
                s.compute.p50_ms,
                s.d2h.p50_ms,
                s.h2d.p99_ms,
                s.compute.p99_ms,
                s.d2h.p99_ms,
            )
            for r in staged
            if (s := r.stages) is not None
        ]
        body.append(
            table(
                ("batch", "H2D p50", "compute p50", "D2H p50", "H2D p99", "compute p99", "D2H p99"),
                stage_rows,
            )
        )
    else:
        body.append(f'<p class="note">{_e(report.measurement.stage_note)}</p>')
    body.append(image(png, f"latency distribution and throughput, {engine.measured_on}"))
    return page(
        f"Latency benchmark: {engine.precision.upper()} {engine.backend} engine {engine.engine_id[:12]}", body
    )


def comparison_html(report: ComparisonReport, png: bytes | None) -> str:
    """The comparison page: where it was measured, one row per engine, notes, plot."""
    places = sorted(
        {
            (b.engine.backend, b.engine.backend_version, b.engine.device)
            for row in report.rows
            if (b := row.benchmark) is not None
        }
    )
    body = [banner(*place) for place in places] or [
        '<div class="banner cpu">No engine of this comparison could run on this host; '
        "nothing was measured.</div>"
    ]
    body.append(f'<p class="note">Model {_e(report.model_id)}; measured at {_e(report.measured_at)}.</p>')
    for batch in report.batch_sizes:
        body.append(f"<h2>Batch {batch}</h2>")
        rows = []
        for row in report.rows:
            result = row.benchmark.result_for(batch) if row.benchmark else None
            accuracy = row.accuracy
            rows.append(
                (
                    row.engine_id[:12],
                    row.precision,
                    row.backend,
                    row.device,
                    result.latency.p50_ms if result else None,
                    result.latency.p99_ms if result else None,
                    result.latency.throughput if result else None,
                    row.speedup_at(batch),
                    accuracy.min_cosine if accuracy else None,
                    accuracy.min_snr_db if accuracy else None,
                    accuracy.min_top1_agreement if accuracy else None,
                    row.engine_bytes,
                )
            )
        headers = (
            "engine",
            "precision",
            "backend",
            "device",
            "p50 ms",
            "p99 ms",
            "inferences/s",
            "speedup vs FP32",
            "min cosine",
            "min SNR dB",
            "top-1 agreement",
            "bytes",
        )
        body.append(table(headers, rows))
    sources = [(row.engine_id[:12], row.accuracy.source) for row in report.rows if row.accuracy]
    if sources:
        body.append("<h2>Where the accuracy figures come from</h2>")
        body.append(table(("engine", "source"), sources))
    for note in report.notes:
        body.append(f'<p class="note">{_e(note)}</p>')
    body.append(image(png, f"engine comparison, {report.measured_on}"))
    return page(f"Engine comparison: model {report.model_id[:12]}", body)


def evaluation_html(report: EvaluationReport, png: bytes | None = None) -> str:
    """The evaluation page: engine vs reference, per-output accuracy, worst layers or why none."""
    engine = report.engine
    body = [banner(engine.backend, engine.backend_version, engine.device), engine_table(engine)]
    body.append(
        f'<p class="note">Reference: {_e(report.reference)} (model {_e(report.reference_model_id)}), '
        f"run with ONNX Runtime on the CPU. {report.samples} sample(s) of set {_e(report.eval_set_id)} "
        f"in batches of {report.batch_size}; measured at {_e(report.measured_at)}.</p>"
    )
    body.append("<h2>Accuracy against the reference</h2>")
    body.append(table(("metric", "value"), _flatten(report.accuracy)))
    body.append("<h2>Worst layers</h2>")
    layers = report.layers
    if layers.available and layers.worst:
        rows = [(d.tensor, d.node, d.op_type, d.snr_db, d.cosine, d.max_abs_error) for d in layers.worst]
        body.append(table(("tensor", "node", "op", "SNR dB", "cosine", "max abs error"), rows))
        body.append(f'<p class="note">{layers.compared_tensors} tensors compared. {_e(layers.note)}</p>')
    else:
        body.append(f'<p class="note">{_e(layers.note)}</p>')
    body.append(image(png, f"SNR per output and worst layers, {engine.measured_on}"))
    return page(
        f"Accuracy evaluation: {engine.precision.upper()} {engine.backend} engine {engine.engine_id[:12]}",
        body,
    )


def _flatten(data: object, prefix: str = "") -> list[tuple[str, Cell]]:
    """Nested report values as (dotted key, value) rows; lists of scalars are joined into one cell."""
    if isinstance(data, dict):
        rows: list[tuple[str, Cell]] = []
        for key, value in data.items():
            rows.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return rows
    if isinstance(data, list):
        if all(not isinstance(item, dict | list) for item in data):
            return [(prefix, ", ".join(str(item) for item in data))]
        return [row for index, item in enumerate(data) for row in _flatten(item, f"{prefix}[{index}]")]
    if data is None or isinstance(data, str | int | float):
        return [(prefix, data if not isinstance(data, bool) else str(data).lower())]
    return [(prefix, str(data))]
