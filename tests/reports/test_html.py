"""HTML report pages: self-contained, escaped, and explicit about where the numbers were measured."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pytest

from service.reports.benchmark import BenchmarkReport
from service.reports.comparison import AccuracySummary, ComparisonEntry, compare_engines
from service.reports.evaluation import EvaluationReport
from service.reports.html import benchmark_html, comparison_html, evaluation_html
from service.reports.latency import LatencyMeasurement, StageBreakdown, StageStats
from service.reports.layer_deltas import LayerDelta, LayerDeltas
from service.reports.plots import PNG_SIGNATURE, benchmark_plot_png
from tests.reports.report_factory import engine_record, measured_report, written_report

HOSTILE = "<script>alert('x')</script>"


class _Structure(HTMLParser):
    """Collects tags and text; fails on nothing, so tests assert on what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Structure:
    parser = _Structure()
    parser.feed(page)
    return parser


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkReport:
    return measured_report(tmp_path_factory.mktemp("html"))


def test_a_benchmark_page_names_device_and_backend_and_says_cpu_is_not_gpu(measured: BenchmarkReport) -> None:
    page = benchmark_html(measured, benchmark_plot_png(measured))
    text = "".join(_parse(page).text)
    assert f"Measured on {measured.engine.device} with onnxruntime {measured.engine.backend_version}." in text
    assert "This is a CPU measurement: it says nothing about GPU latency" in text
    assert "not available on this backend" in text
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "http" not in page.split("<body>")[1]


def test_a_benchmark_page_has_the_numbers_and_the_plot_embedded(measured: BenchmarkReport) -> None:
    png = benchmark_plot_png(measured)
    structure = _parse(benchmark_html(measured, png))
    assert structure.tags.count("table") == 2  # engine, latency (stages are a note on the CPU)
    assert base64.b64decode(structure.images[0].removeprefix("data:image/png;base64,")) == png
    text = "".join(structure.text)
    for result in measured.results:
        assert f"{result.latency.p50_ms:.3f}" in text and f"{result.latency.p99_ms:.3f}" in text


def test_every_piece_of_data_is_escaped() -> None:
    record = engine_record(HOSTILE, "fp32")
    report = written_report(record, {1: 2.0}, device=HOSTILE, stage_note=HOSTILE)
    page = benchmark_html(report, None)
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page


def test_a_gpu_page_shows_stage_timings_and_no_cpu_disclaimer() -> None:
    record = engine_record("g" * 64, "int8", backend="tensorrt")
    base = written_report(record, {1: 1.0}, device="NVIDIA H100 80GB HBM3 (sm_90)", stage_note="")
    stages = StageBreakdown(
        "NVIDIA H100 80GB HBM3 (sm_90)",
        StageStats(0.1, 0.1, 0.2),
        StageStats(0.7, 0.7, 0.9),
        StageStats(0.05, 0.05, 0.06),
    )
    result = base.results[0]
    with_stages = type(result)(
        result.batch_size, result.latency, stages, result.distribution_ms, result.wall_seconds
    )
    report = BenchmarkReport(
        base.engine, base.config, LatencyMeasurement((with_stages,), (), ""), base.host, base.measured_at
    )
    page = benchmark_html(report, None)
    text = "".join(_parse(page).text)
    assert "Measured on NVIDIA H100 80GB HBM3 (sm_90) with tensorrt 1.0." in text
    assert "CPU measurement" not in text
    assert "H2D p50" in text and "0.700" in text


def test_a_comparison_page_lists_every_engine_with_speedup_and_accuracy_source() -> None:
    fp32, int8 = engine_record("a" * 64, "fp32"), engine_record("b" * 64, "int8")
    rtx = engine_record("c" * 64, "fp16", backend="tensorrt-rtx")
    accuracy = AccuracySummary(source="evaluation report j1", min_cosine=0.998, min_snr_db=31.5)
    report = compare_engines(
        "m" * 64,
        [
            ComparisonEntry(fp32, written_report(fp32, {1: 4.0})),
            ComparisonEntry(int8, written_report(int8, {1: 2.0}), "", accuracy),
            ComparisonEntry(rtx, None, "its backend (tensorrt-rtx) cannot run on this host"),
        ],
        (1,),
    )
    text = "".join(_parse(comparison_html(report, None)).text)
    assert "Measured on CPU (test) with onnxruntime 1.0." in text
    assert "2.000" in text  # INT8 speedup over FP32 at batch 1
    assert "0.998" in text and "evaluation report j1" in text
    assert "was not measured: its backend (tensorrt-rtx) cannot run on this host" in text


def test_an_evaluation_page_shows_accuracy_and_the_worst_layers_or_why_not() -> None:
    record = engine_record("e" * 64, "int8")
    report = written_report(record, {1: 1.0})
    deltas = LayerDeltas(
        True, "first 8 samples", 12, 8, (LayerDelta("conv_out", "conv", "Conv", 0.99, 0.5, 18.25),)
    )
    evaluation = EvaluationReport(
        engine=report.engine,
        reference_model_id="r" * 64,
        reference="the FP32 model",
        eval_set_id="s" * 64,
        samples=8,
        batch_size=8,
        accuracy={"outputs": {"logits": {"cosine": 0.995, "top1_agreement": 1.0}}},
        layers=deltas,
        measured_at="2026-01-01T00:00:00",
    )
    text = "".join(_parse(evaluation_html(evaluation)).text)
    assert "outputs.logits.cosine" in text and "0.995" in text
    assert "conv_out" in text and "18.250" in text and "12 tensors compared" in text
    without = EvaluationReport(**{**evaluation.__dict__, "layers": LayerDeltas(False, "not for <tensorrt>")})
    page = evaluation_html(without)
    assert "not for &lt;tensorrt&gt;" in page
    assert re.search(r"<th>tensor</th>", page) is None


def test_pages_carry_no_png_when_there_is_no_plot() -> None:
    record = engine_record("e" * 64, "fp32")
    page = benchmark_html(written_report(record, {1: 1.0}), None)
    assert "<img" not in page and PNG_SIGNATURE not in page.encode()
