"""precision "auto": the choice between INT8 and the float fallback, from INT8's own evidence."""

from __future__ import annotations

import pytest

from service.builds.auto_precision import Int8Evidence, choose_precision, fallback_precision


def _evidence(target_met: bool | None, speedup: float | None) -> Int8Evidence:
    return Int8Evidence(engine_id="e" * 64, target_met=target_met, speedup_vs_fp32=speedup, device="CPU x")


def test_int8_that_misses_its_target_gives_way_to_the_fallback_however_fast() -> None:
    choice = choose_precision(_evidence(False, 3.0), "fp16")
    assert choice.chosen == "fp16" and "missed its accuracy target" in choice.reason


@pytest.mark.parametrize("speedup", [1.0, 0.7])
def test_int8_no_faster_than_fp32_gives_way(speedup: float) -> None:
    choice = choose_precision(_evidence(True, speedup), "fp32")
    assert choice.chosen == "fp32" and "not faster" in choice.reason and choice.speed_measured


def test_int8_that_meets_its_target_and_is_faster_is_chosen() -> None:
    choice = choose_precision(_evidence(True, 1.6), "fp32")
    assert choice.chosen == "int8" and "1.60x faster than FP32 on CPU x" in choice.reason


def test_unmeasured_speed_is_an_assumption_said_as_one() -> None:
    choice = choose_precision(_evidence(True, None), "fp16")
    assert choice.chosen == "int8" and not choice.speed_measured
    assert "speed not measured" in choice.reason


def test_an_explicitly_quantized_model_is_judged_by_speed_alone() -> None:
    assert choose_precision(_evidence(None, 0.9), "fp32").chosen == "fp32"
    assert "quantized before upload" in choose_precision(_evidence(None, 1.2), "fp32").reason


def test_evidence_reads_an_engine_report_and_a_job_result_alike() -> None:
    report = {"target_met": True, "speed": {"speedup_vs_fp32": 1.25, "device": "CPU y"}}
    result = {"target_met": True, "speedup_vs_fp32": 1.25, "speed": {"device": "CPU y"}}
    assert Int8Evidence.from_report("a", report) == Int8Evidence.from_report("a", result)
    assert Int8Evidence.from_report("a", {"target_met": False}).speedup_vs_fp32 is None


def test_the_fallback_is_fp32_on_onnx_runtime_and_fp16_on_tensorrt() -> None:
    assert fallback_precision("onnxruntime") == "fp32"
    assert fallback_precision("tensorrt") == fallback_precision("tensorrt-rtx") == "fp16"
