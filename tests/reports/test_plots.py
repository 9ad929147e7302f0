"""Report plots are real PNGs, drawn from real and written reports, from any thread."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from service.errors import Conflict
from service.reports.benchmark import BenchmarkReport
from service.reports.comparison import ComparisonEntry, compare_engines
from service.reports.latency import SkippedBatch
from service.reports.plots import PNG_SIGNATURE, benchmark_plot_png, comparison_plot_png
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
