"""BuildReport: the typed build evidence and the JSON object stored with each engine."""

from __future__ import annotations

from typing import Any

from service.catalog.build_report import BuildReport


def _stored() -> dict[str, Any]:
    return {
        "task": {"kind": "classification", "top1_agreement": 0.99},
        "target_met": True,
        "int8_share": 0.8,
        "warnings": ["held-out set is small"],
        "backend": {"name": "onnxruntime", "version": "1.31", "device": "CPU", "compute_capability": None},
        "preparation": ["calibrated (entropy) and placed Q/DQ"],
        "kept_layers": ["head"],
        "layer_counts": {"int8": 5, "fp32": 2},
        "layers": {"layers": [{"name": "conv"}]},
        "fusions": {"summary": {"fused": 3}},
        "accuracy": {"compared": "FP32 model vs the Q/DQ model"},
        "quantization": {"method": "entropy"},
        "build_log_tail": ["built"],
    }


def test_a_stored_report_reads_back_to_the_same_json() -> None:
    stored = _stored()
    report = BuildReport.from_dict(stored)
    assert report.to_dict() == stored
    assert list(report.to_dict()) == list(stored)  # the key order a person reads is kept
    assert (report.target_met, report.kept_layers, report.fusions["summary"]) == (
        True,
        ("head",),
        {"fused": 3},
    )


def test_speed_appears_only_when_a_speed_check_ran_and_its_warning_is_appended() -> None:
    report = BuildReport.from_dict(_stored())
    assert "speed" not in report.to_dict()
    timed = report.with_speed({"speedup_vs_fp32": 0.9}, "INT8 is slower than FP32 here")
    assert timed.to_dict()["speed"] == {"speedup_vs_fp32": 0.9}
    assert timed.warnings == ("held-out set is small", "INT8 is slower than FP32 here")
    assert report.warnings == ("held-out set is small",)  # frozen: the original is unchanged
    assert report.with_speed({"speedup_vs_fp32": 2.0}).warnings == report.warnings


def test_an_old_or_partial_row_reads_with_empty_parts() -> None:
    partial = BuildReport.from_dict({"layer_counts": {"fp32": 3}, "warnings": None, "accuracy": "n/a"})
    assert partial.layer_counts == {"fp32": 3}
    assert (partial.warnings, partial.accuracy, partial.task, partial.fusions) == ((), None, None, {})
    assert BuildReport.from_dict({}) == BuildReport()
