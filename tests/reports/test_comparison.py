"""Engine comparisons: speedups against FP32, accuracy summaries, refusals, and a JSON round trip."""

from __future__ import annotations

import json

import pytest

from service.errors import BadInput
from service.reports.comparison import (
    ComparisonEntry,
    ComparisonReport,
    check_comparable,
    compare_engines,
    summarize_accuracy,
)
from tests.reports.report_factory import engine_record, written_report

MODEL = "m" * 64


def test_speedup_is_the_fp32_p50_over_each_engine_p50_per_batch_size() -> None:
    fp32, fp16, int8 = (engine_record(c * 64, p) for c, p in (("a", "fp32"), ("b", "fp16"), ("c", "int8")))
    report = compare_engines(
        MODEL,
        [
            ComparisonEntry(int8, written_report(int8, {1: 2.0, 8: 5.0})),
            ComparisonEntry(fp32, written_report(fp32, {1: 4.0, 8: 20.0})),
            ComparisonEntry(fp16, written_report(fp16, {1: 3.2})),
        ],
        (1, 8),
    )
    assert report.baseline_engine_id == fp32.id
    rows = {row.precision: row for row in report.rows}
    assert dict(rows["int8"].speedup) == {1: 2.0, 8: 4.0}
    assert dict(rows["fp32"].speedup) == {1: 1.0, 8: 1.0}
    assert dict(rows["fp16"].speedup) == pytest.approx({1: 1.25})
    assert [row.engine_id for row in report.rows] == [int8.id, fp32.id, fp16.id]  # request order
    assert report.measured_on == "measured on CPU (test) with onnxruntime 1.0"
    assert report.notes == ()


def test_without_a_measured_fp32_engine_there_is_no_speedup_and_a_note_says_why() -> None:
    int8, rtx = engine_record("c" * 64, "int8"), engine_record("d" * 64, "fp32", backend="tensorrt-rtx")
    report = compare_engines(
        MODEL,
        [
            ComparisonEntry(int8, written_report(int8, {1: 2.0})),
            ComparisonEntry(rtx, None, "cannot run here"),
        ],
        (1,),
    )
    assert report.baseline_engine_id is None
    assert all(row.speedup == () for row in report.rows)
    assert any("No FP32 engine was measured" in note for note in report.notes)
    assert any(f"Engine {rtx.id[:12]} was not measured: cannot run here" in note for note in report.notes)
    assert report.rows[1].device == "CPU (test)" and report.rows[1].benchmark is None


def test_speedups_across_devices_are_flagged() -> None:
    fp32, int8 = engine_record("a" * 64, "fp32"), engine_record("c" * 64, "int8", backend="tensorrt")
    report = compare_engines(
        MODEL,
        [
            ComparisonEntry(fp32, written_report(fp32, {1: 4.0})),
            ComparisonEntry(int8, written_report(int8, {1: 0.5}, device="NVIDIA L4 (sm_89)")),
        ],
        (1,),
    )
    assert any("compares hardware and backends, not only precision" in note for note in report.notes)
    assert report.measured_on.startswith("engines measured in different places: ")


def test_accuracy_summaries_keep_the_worst_value_over_outputs_wherever_it_is_nested() -> None:
    accuracy = {
        "samples": 64,
        "outputs": [
            {
                "name": "logits",
                "cosine": 0.999,
                "max_abs_error": 0.02,
                "snr_db": 35.0,
                "top1_agreement": 0.97,
            },
            {"name": "boxes", "cosine": 0.990, "max_abs_error": 0.30, "snr_db": 22.5},
        ],
        "per_output": {"extra": {"min_cosine": 0.95, "mean_cosine": 0.999}},
    }
    summary = summarize_accuracy(accuracy, "evaluation report j")
    assert (summary.min_cosine, summary.max_abs_error, summary.min_snr_db, summary.min_top1_agreement) == (
        0.95,
        0.30,
        22.5,
        0.97,
    )
    assert summary.source == "evaluation report j"
    empty = summarize_accuracy({"note": "nothing measured"}, "build check")
    assert empty.min_cosine is None and empty.min_top1_agreement is None


@pytest.mark.parametrize(
    ("ids", "models", "message"),
    [
        (["a"], ["m"], "Compare from 2 to 8 engines; 1 were given"),
        (["a", "a"], ["m", "m"], "listed more than once"),
        (["a", "b"], ["m", "n"], "different models"),
    ],
)
def test_comparisons_need_two_or_more_distinct_engines_of_one_model(
    ids: list[str], models: list[str], message: str
) -> None:
    records = [engine_record(i * 64, "fp32", model_id=m * 64) for i, m in zip(ids, models, strict=True)]
    with pytest.raises(BadInput, match=message):
        check_comparable(records, {})


def test_a_qdq_model_compares_with_the_fp32_model_it_was_quantized_from() -> None:
    fp32 = engine_record("a" * 64, "fp32", model_id="f" * 64)
    int8 = engine_record("b" * 64, "int8", model_id="q" * 64)
    assert check_comparable([fp32, int8], {"q" * 64: "f" * 64}) == "f" * 64


def test_a_comparison_reads_back_from_its_json() -> None:
    fp32, int8 = engine_record("a" * 64, "fp32"), engine_record("c" * 64, "int8")
    accuracy = summarize_accuracy({"cosine": 0.99}, "the build's accuracy check")
    report = compare_engines(
        MODEL,
        [
            ComparisonEntry(fp32, written_report(fp32, {1: 4.0})),
            ComparisonEntry(int8, written_report(int8, {1: 2.0}), "", accuracy),
        ],
        (1,),
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data["engines"][1]["speedup_vs_fp32"] == {"1": 2.0}
    assert data["engines"][1]["latency_ms"]["1"]["p50"] == 2.0
    again = ComparisonReport.from_dict(data)
    assert again.rows[1].speedup == ((1, 2.0),)
    assert again.rows[1].accuracy == accuracy
    assert again.rows[0].benchmark is not None and again.rows[0].benchmark.results[0].latency.p50_ms == 4.0
