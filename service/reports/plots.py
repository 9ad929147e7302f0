"""Report plots as PNG bytes: latency distributions, throughput against batch size, engine comparisons.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global figure state), so plots
can be rendered from any thread of the server. matplotlib is imported inside the functions: it is
slow to import and only report downloads need it. Every plot's title names the device and backend
the numbers were measured on.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from service.errors import Conflict

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from service.reports.benchmark import BenchmarkReport
    from service.reports.comparison import ComparisonReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DPI = 110


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def benchmark_plot_png(report: BenchmarkReport) -> bytes:
    """Latency distribution per batch size (violins, with p50/p99 marks) and throughput vs batch size."""
    results = report.results
    if not results:
        raise Conflict(
            "This benchmark measured no batch size (all were skipped), so there is nothing to plot."
        )
    figure = _figure(10.0, 4.2)
    latency_axes, throughput_axes = figure.subplots(1, 2)
    positions = list(range(1, len(results) + 1))
    # The violins stop at p99: a few scheduler hiccups would otherwise stretch the axis and flatten
    # the body of the distribution; the table in the report keeps the max.
    distributions = [
        [v for v in r.distribution_ms if v <= r.latency.p99_ms] or [r.latency.p50_ms] for r in results
    ]
    violins = latency_axes.violinplot(distributions, positions=positions, showextrema=True, widths=0.8)
    for body in violins["bodies"]:
        body.set_alpha(0.45)
    latency_axes.scatter(
        positions, [r.latency.p50_ms for r in results], marker="o", color="black", label="p50"
    )
    latency_axes.scatter(
        positions, [r.latency.p99_ms for r in results], marker="^", color="tab:red", label="p99"
    )
    latency_axes.set_xticks(positions, [str(r.batch_size) for r in results])
    latency_axes.set_xlabel("batch size")
    latency_axes.set_ylabel("latency per call (ms)")
    latency_axes.set_title("Latency distribution (min to p99)")
    latency_axes.legend(loc="upper left", fontsize="small")
    top, bottom = max(r.latency.p99_ms for r in results), min(r.latency.min_ms for r in results)
    if bottom > 0 and top / bottom > 20:  # batch sizes far apart: a linear axis would flatten the small ones
        latency_axes.set_yscale("log")
        latency_axes.set_ylim(bottom * 0.8, top * 1.5)
    else:
        latency_axes.set_ylim(0, top * 1.15)
    _throughput(
        throughput_axes, [r.batch_size for r in results], [r.latency.throughput for r in results], None
    )
    engine = report.engine
    figure.suptitle(
        f"{engine.precision.upper()} {engine.backend} engine {engine.engine_id[:12]}: {engine.measured_on}",
        fontsize="medium",
    )
    return _png(figure)


def comparison_plot_png(report: ComparisonReport) -> bytes:
    """p50 latency per engine at each batch size (grouped bars) and throughput vs batch size per engine."""
    measured = [(row.label, row.benchmark) for row in report.rows if row.benchmark and row.benchmark.results]
    if not measured:
        raise Conflict("No engine of this comparison could be measured here, so there is nothing to plot.")
    figure = _figure(11.0, 4.4)
    latency_axes, throughput_axes = figure.subplots(1, 2)
    batch_sizes = sorted({r.batch_size for _, benchmark in measured for r in benchmark.results})
    width = 0.8 / len(measured)
    for index, (label, benchmark) in enumerate(measured):
        p50 = [_p50(benchmark, b) for b in batch_sizes]
        offsets = [i + (index - (len(measured) - 1) / 2) * width for i in range(len(batch_sizes))]
        latency_axes.bar(offsets, [v if v is not None else 0.0 for v in p50], width=width, label=label)
        sizes = [r.batch_size for r in benchmark.results]
        _throughput(throughput_axes, sizes, [r.latency.throughput for r in benchmark.results], label)
    latency_axes.set_xticks(range(len(batch_sizes)), [str(b) for b in batch_sizes])
    latency_axes.set_xlabel("batch size")
    latency_axes.set_ylabel("p50 latency per call (ms)")
    latency_axes.set_title("p50 latency")
    latency_axes.legend(fontsize="small")
    throughput_axes.legend(fontsize="small")
    figure.suptitle(f"Engines of model {report.model_id[:12]}: {report.measured_on}", fontsize="medium")
    return _png(figure)


def _p50(report: BenchmarkReport, batch_size: int) -> float | None:
    result = report.result_for(batch_size)
    return result.latency.p50_ms if result is not None else None


def _throughput(axes: Axes, batch_sizes: list[int], throughput: list[float], label: str | None) -> None:
    axes.plot(batch_sizes, throughput, marker="o", label=label)
    if len(batch_sizes) > 1 and max(batch_sizes) / min(batch_sizes) >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axes.set_xlabel("batch size")
    axes.set_ylabel("throughput (inferences/s)")
    axes.set_title("Throughput")
    axes.set_ylim(bottom=0)
