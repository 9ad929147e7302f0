"""Report plots as PNG bytes: latency distributions, throughput against batch size, engine comparisons.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global figure state), so plots
can be rendered from any thread of the server. matplotlib is imported inside the functions: it is
slow to import and only report downloads need it. Every plot's title names the device and backend
the numbers were measured on.

Every axis is scaled to hold all of its data (limits are set once, after every series is drawn), and
each PNG carries the limits it was drawn with, and the range of the data on each axis, as JSON in its
``plot-limits`` text chunk (:data:`LIMITS_KEY`), so a client or a test can check that nothing was cut
off without reading pixels.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from service.errors import Conflict

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from service.reports.benchmark import BenchmarkReport
    from service.reports.comparison import ComparisonReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LIMITS_KEY = "plot-limits"
_DPI = 110
_HEADROOM = 1.12  # room above the highest point so markers and labels are not cut by the frame


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure, data_ranges: Mapping[str, tuple[float, float]]) -> bytes:
    """The figure as PNG, with each named axes' limits and the range of its values in ``plot-limits``.

    ``data_ranges`` maps an axes label to the (min, max) of the values it shows on its value axis (y, or
    x for horizontal bars).
    """
    limits: dict[str, dict[str, list[float]]] = {}
    for axes in figure.axes:
        name = str(axes.get_label())
        if name in data_ranges:
            limits[name] = {
                "xlim": [float(v) for v in axes.get_xlim()],
                "ylim": [float(v) for v in axes.get_ylim()],
                "data": [float(v) for v in data_ranges[name]],
            }
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={LIMITS_KEY: json.dumps(limits)})
    return buffer.getvalue()


def _data_range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (0.0, 0.0)


def benchmark_plot_png(report: BenchmarkReport) -> bytes:
    """Latency distribution per batch size (violins, with p50/p99 marks) and throughput vs batch size."""
    results = report.results
    if not results:
        raise Conflict(
            "This benchmark measured no batch size (all were skipped), so there is nothing to plot."
        )
    figure = _figure(10.0, 4.2)
    latency_axes, throughput_axes = figure.subplots(1, 2)
    latency_axes.set_label("latency")
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
    throughput = [r.latency.throughput for r in results]
    _throughput(throughput_axes, [(None, [r.batch_size for r in results], throughput)])
    engine = report.engine
    figure.suptitle(
        f"{engine.precision.upper()} {engine.backend} engine {engine.engine_id[:12]}: {engine.measured_on}",
        fontsize="medium",
    )
    plotted = [v for r, shown in zip(results, distributions, strict=True) for v in (*shown, r.latency.p99_ms)]
    return _png(figure, {"latency": _data_range(plotted), "throughput": _data_range(throughput)})


def comparison_plot_png(report: ComparisonReport) -> bytes:
    """p50 latency per engine at each batch size (grouped bars) and throughput vs batch size per engine."""
    measured = [(row.label, row.benchmark) for row in report.rows if row.benchmark and row.benchmark.results]
    if not measured:
        raise Conflict("No engine of this comparison could be measured here, so there is nothing to plot.")
    figure = _figure(11.0, 4.4)
    latency_axes, throughput_axes = figure.subplots(1, 2)
    latency_axes.set_label("latency")
    batch_sizes = sorted({r.batch_size for _, benchmark in measured for r in benchmark.results})
    width = 0.8 / len(measured)
    p50_values: list[float] = []
    series: list[tuple[str | None, list[int], list[float]]] = []
    for index, (label, benchmark) in enumerate(measured):
        p50 = [_p50(benchmark, b) for b in batch_sizes]
        p50_values += [v for v in p50 if v is not None]
        offsets = [i + (index - (len(measured) - 1) / 2) * width for i in range(len(batch_sizes))]
        latency_axes.bar(offsets, [v if v is not None else 0.0 for v in p50], width=width, label=label)
        series.append(
            (
                label,
                [r.batch_size for r in benchmark.results],
                [r.latency.throughput for r in benchmark.results],
            )
        )
    latency_axes.set_xticks(range(len(batch_sizes)), [str(b) for b in batch_sizes])
    latency_axes.set_xlabel("batch size")
    latency_axes.set_ylabel("p50 latency per call (ms)")
    latency_axes.set_title("p50 latency")
    latency_axes.set_ylim(0, max(p50_values, default=1.0) * _HEADROOM)
    latency_axes.legend(fontsize="small")
    _throughput(throughput_axes, series)
    throughput_axes.legend(fontsize="small")
    figure.suptitle(f"Engines of model {report.model_id[:12]}: {report.measured_on}", fontsize="medium")
    throughput = [v for _, _, values in series for v in values]
    return _png(figure, {"latency": _data_range(p50_values), "throughput": _data_range(throughput)})


def _p50(report: BenchmarkReport, batch_size: int) -> float | None:
    result = report.result_for(batch_size)
    return result.latency.p50_ms if result is not None else None


def _throughput(axes: Axes, series: Sequence[tuple[str | None, list[int], list[float]]]) -> None:
    """Throughput against batch size, one line per series; the axes fit every series' points.

    Limits are set once, after all lines: matplotlib freezes autoscaling at the first ``set_ylim``,
    so setting them per series cut off any later engine that was faster than the first.
    """
    axes.set_label("throughput")
    for label, batch_sizes, throughput in series:
        axes.plot(batch_sizes, throughput, marker="o", label=label)
    sizes = sorted({b for _, batch_sizes, _ in series for b in batch_sizes})
    if len(sizes) > 1 and max(sizes) / min(sizes) >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(b) for b in sizes])
    axes.set_xlabel("batch size")
    axes.set_ylabel("throughput (inferences/s)")
    axes.set_title("Throughput")
    top = max((v for _, _, values in series for v in values if math.isfinite(v)), default=1.0)
    axes.set_ylim(0, top * _HEADROOM)


def evaluation_plot_png(report: Mapping[str, Any]) -> bytes:
    """An evaluation report (its stored JSON): SNR per output, and the worst layers' SNR when measured.

    Identical outputs have an infinite SNR; they are drawn at the top of the axis and labelled "exact".
    """
    outputs = [o for o in (report.get("accuracy") or {}).get("outputs", []) if isinstance(o, Mapping)]
    if not outputs:
        raise Conflict("This evaluation compared no outputs, so there is nothing to plot.")
    layers = report.get("layer_deltas") or {}
    worst = [d for d in layers.get("worst", []) if isinstance(d, Mapping)] if layers.get("available") else []
    figure = _figure(11.0 if worst else 6.0, 4.4)
    axes_list = figure.subplots(1, 2 if worst else 1, squeeze=False)[0]
    output_axes = axes_list[0]
    output_axes.set_label("outputs")
    output_snr = [float(o.get("snr_db", math.nan)) for o in outputs]
    _snr_bars(output_axes, [str(o.get("name")) for o in outputs], output_snr, horizontal=False)
    output_axes.set_title("SNR per output vs FP32 (higher is better)")
    ranges = {"outputs": _data_range(output_snr)}
    if worst:
        layer_axes = axes_list[1]
        layer_axes.set_label("layers")
        layer_snr = [float(d.get("snr_db", math.nan)) for d in worst]
        _snr_bars(
            layer_axes, [str(d.get("node") or d.get("tensor")) for d in worst], layer_snr, horizontal=True
        )
        layer_axes.set_title(f"Worst layers ({layers.get('compared_tensors', '?')} compared)")
        ranges["layers"] = _data_range(layer_snr)
    engine = report.get("engine") or {}
    figure.suptitle(
        f"{str(engine.get('precision', '')).upper()} {engine.get('backend', '')} engine "
        f"{str(engine.get('engine_id', ''))[:12]} on set {str(report.get('eval_set_id', ''))[:12]} "
        f"({report.get('samples', '?')} samples): {report.get('summary', '')}",
        fontsize="medium",
    )
    return _png(figure, ranges)


def _snr_bars(axes: Axes, labels: list[str], snr_db: list[float], *, horizontal: bool) -> None:
    finite = [v for v in snr_db if math.isfinite(v)]
    top = max(finite, default=60.0) * _HEADROOM if max(finite, default=60.0) > 0 else 60.0
    bottom = min(0.0, min(finite, default=0.0) * _HEADROOM)
    shown = [v if math.isfinite(v) else top for v in snr_db]
    positions = list(range(len(labels)))
    if horizontal:
        bars = axes.barh(positions, shown, color="tab:blue")
        axes.set_yticks(positions, labels, fontsize="small")
        axes.invert_yaxis()  # worst first, at the top
        axes.set_xlabel("SNR (dB)")
        axes.set_xlim(bottom, top)
    else:
        bars = axes.bar(positions, shown, color="tab:blue")
        axes.set_xticks(positions, labels, fontsize="small")
        axes.set_ylabel("SNR (dB)")
        axes.set_ylim(bottom, top)
    for bar, value in zip(bars, snr_db, strict=True):
        if not math.isfinite(value):
            bar.set_color("tab:green")
            bar.set_label("exact")
