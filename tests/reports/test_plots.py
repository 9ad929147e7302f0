"""Report plots are real PNGs, drawn from real and written reports, from any thread."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from PIL import Image

from service.errors import Conflict
from service.reports.benchmark import BenchmarkReport
from service.reports.comparison import ComparisonEntry, compare_engines
from service.reports.latency import SkippedBatch
from service.reports.plots import (
    LIMITS_KEY,
    PNG_SIGNATURE,
    benchmark_plot_png,
    comparison_plot_png,
    evaluation_plot_png,
)
from tests.reports.report_factory import engine_record, measured_report, written_report


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkReport:
    return measured_report(tmp_path_factory.mktemp("plots"))


def _image(png: bytes) -> Image.Image:
    assert png.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def test_a_benchmark_plot_is_a_png_of_the_figure_size(measured: BenchmarkReport) -> None:
    image = _image(benchmark_plot_png(measured))
    assert image.format == "PNG"
    assert image.size == (1100, 462)


def test_a_benchmark_read_back_from_its_json_plots_too(measured: BenchmarkReport) -> None:
    again = BenchmarkReport.from_dict(measured.to_dict())
    assert _image(benchmark_plot_png(again)).size == (1100, 462)


def test_a_benchmark_whose_batches_were_all_skipped_has_nothing_to_plot() -> None:
    record = engine_record("e" * 64, "fp32")
    report = written_report(record, {}, skipped=(SkippedBatch(8, "batch 8 skipped: fixed batch of 1"),))
    with pytest.raises(Conflict, match="all were skipped"):
        benchmark_plot_png(report)


def test_plots_render_concurrently_from_server_threads(measured: BenchmarkReport) -> None:
    with ThreadPoolExecutor(4) as executor:
        pngs = list(executor.map(lambda _: benchmark_plot_png(measured), range(4)))
    assert all(_image(png).size == (1100, 462) for png in pngs)


def test_a_comparison_plot_shows_the_measured_engines() -> None:
    fp32, int8 = engine_record("a" * 64, "fp32"), engine_record("b" * 64, "int8")
    rtx = engine_record("c" * 64, "fp16", backend="tensorrt-rtx")
    entries = [
        ComparisonEntry(fp32, written_report(fp32, {1: 4.0, 8: 20.0})),
        ComparisonEntry(int8, written_report(int8, {1: 2.0, 8: 9.0})),
        ComparisonEntry(rtx, None, "its backend (tensorrt-rtx) cannot run on this host"),
    ]
    report = compare_engines("m" * 64, entries, (1, 8))
    assert _image(comparison_plot_png(report)).size == (1210, 484)


def test_a_comparison_where_nothing_ran_has_nothing_to_plot() -> None:
    rtx = engine_record("c" * 64, "fp16", backend="tensorrt-rtx")
    report = compare_engines("m" * 64, [ComparisonEntry(rtx, None, "cannot run here")], (1,))
    with pytest.raises(Conflict, match="No engine of this comparison could be measured"):
        comparison_plot_png(report)


def _limits(png: bytes) -> dict[str, Any]:
    text = Image.open(io.BytesIO(png)).text  # type: ignore[attr-defined]
    return dict(json.loads(text[LIMITS_KEY]))


def test_the_throughput_axis_holds_the_fastest_engine_even_when_it_is_drawn_last() -> None:
    # FP32 is drawn first and is the slower one: its axis limits once cut off INT8's batch-8 point.
    fp32, int8 = engine_record("a" * 64, "fp32"), engine_record("b" * 64, "int8")
    entries = [
        ComparisonEntry(fp32, written_report(fp32, {1: 20.0, 8: 90.0})),
        ComparisonEntry(int8, written_report(int8, {1: 12.0, 8: 40.46})),
    ]
    report = compare_engines("m" * 64, entries, (1, 8))
    limits = _limits(comparison_plot_png(report))
    throughput = limits["throughput"]
    fastest = max(r.latency.throughput for e in entries if e.benchmark for r in e.benchmark.results)
    assert throughput["data"][1] == pytest.approx(fastest) and fastest > 190
    assert throughput["ylim"][0] == 0 and throughput["ylim"][1] > fastest
    latency = limits["latency"]
    assert latency["ylim"][1] > latency["data"][1] == pytest.approx(90.0)


def test_the_benchmark_plot_axes_hold_every_plotted_point(measured: BenchmarkReport) -> None:
    limits = _limits(benchmark_plot_png(measured))
    for name in ("latency", "throughput"):
        low, high = limits[name]["ylim"]
        data_low, data_high = limits[name]["data"]
        assert low <= data_low and data_high < high, (name, limits[name])


def _evaluation(snr: list[float], worst: list[float] | None) -> dict[str, Any]:
    outputs = [{"name": f"out{i}", "cosine": 0.99, "snr_db": value} for i, value in enumerate(snr)]
    layers = [
        {"tensor": f"t{i}", "node": f"conv{i}", "op_type": "Conv", "cosine": 0.9, "max_abs_error": 1.0,
         "snr_db": value}
        for i, value in enumerate(worst or [])
    ]  # fmt: skip
    return {
        "summary": "measured on CPU with onnxruntime",
        "engine": {"engine_id": "e" * 64, "precision": "int8", "backend": "onnxruntime"},
        "eval_set_id": "s" * 64,
        "samples": 8,
        "accuracy": {"outputs": outputs},
        "layer_deltas": {"available": worst is not None, "compared_tensors": 12, "worst": layers},
    }


def test_an_evaluation_plot_shows_every_output_and_the_worst_layers() -> None:
    png = evaluation_plot_png(_evaluation([31.5, 12.0], [3.5, 7.25, 44.0]))
    limits = _limits(png)
    assert limits["outputs"]["data"] == [12.0, 31.5] and limits["outputs"]["ylim"][1] > 31.5
    assert limits["layers"]["data"] == [3.5, 44.0] and max(limits["layers"]["xlim"]) > 44.0
    assert _image(png).size == (1210, 484)


def test_an_evaluation_of_identical_outputs_plots_an_exact_bar() -> None:
    limits = _limits(evaluation_plot_png(_evaluation([float("inf")], None)))
    assert set(limits) == {"outputs"} and limits["outputs"]["ylim"][1] > 0


def test_an_evaluation_without_outputs_has_nothing_to_plot() -> None:
    with pytest.raises(Conflict, match="compared no outputs"):
        evaluation_plot_png(_evaluation([], None))
