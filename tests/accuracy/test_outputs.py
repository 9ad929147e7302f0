"""Streaming accuracy comparison: the metrics, their edge cases, and ONNX Runtime evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.accuracy.outputs import (
    MAX_SNR_DB,
    AccuracyAccumulator,
    OutputAccuracy,
    evaluate_with_onnxruntime,
    snr_db,
)
from service.errors import BadInput, InvalidInferenceInput
from service.quantize.targets import qdq_model_from_scales, tensors_to_calibrate
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder


def _report_for(ref: np.ndarray, cand: np.ndarray, name: str = "y") -> OutputAccuracy:
    acc = AccuracyAccumulator()
    acc.update({name: ref}, {name: cand})
    return acc.finish().output(name)


def test_identical_outputs_are_exact() -> None:
    ref = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)

    out = _report_for(ref, ref.copy())

    assert out.cosine == pytest.approx(1.0) and out.worst_sample_cosine == pytest.approx(1.0)
    assert out.snr_db == MAX_SNR_DB
    assert out.max_abs_error == 0.0 and out.mean_abs_error == 0.0
    assert out.top1_agreement == 1.0 and out.elements == 40


def test_metrics_match_their_definitions() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((8, 5))
    cand = ref + 0.1 * rng.standard_normal((8, 5))

    out = _report_for(ref, cand)

    err = ref - cand
    assert out.snr_db == pytest.approx(10 * math.log10(np.sum(ref**2) / np.sum(err**2)))
    assert out.cosine == pytest.approx(np.sum(ref * cand) / np.linalg.norm(ref) / np.linalg.norm(cand))
    assert out.max_abs_error == pytest.approx(np.abs(err).max())
    assert out.mean_abs_error == pytest.approx(np.abs(err).mean())
    per_row = np.sum(ref * cand, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(cand, axis=1)
    assert out.worst_sample_cosine == pytest.approx(per_row.min())
    assert out.top1_agreement == pytest.approx(np.mean(ref.argmax(1) == cand.argmax(1)))


def test_one_ruined_sample_shows_in_the_worst_sample_cosine() -> None:
    ref = np.ones((16, 32), np.float32)
    cand = ref.copy()
    cand[3] = -1.0

    out = _report_for(ref, cand)

    assert out.cosine > 0.8
    assert out.worst_sample_cosine == pytest.approx(-1.0)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((4, 10), True), ((2, 7, 30), True), ((4, 1), False), ((4,), False), ((1, 1, 8, 8), False)],
)
def test_top1_agreement_only_for_class_score_shapes(shape: tuple[int, ...], expected: bool) -> None:
    ref = np.random.default_rng(2).standard_normal(shape)

    out = _report_for(ref, ref)

    assert (out.top1_agreement is not None) is expected


def test_per_step_top1_counts_every_step() -> None:
    ref = np.zeros((1, 4, 3))
    ref[0, :, 0] = 1.0
    cand = ref.copy()
    cand[0, 2, 1] = 2.0  # one of four steps changes its arg-max

    assert _report_for(ref, cand).top1_agreement == pytest.approx(0.75)


def test_non_finite_candidate_values_are_counted_and_excluded() -> None:
    ref = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    cand = ref.copy()
    cand[0, 1] = np.nan
    cand[1, 2] = np.inf

    out = _report_for(ref, cand)

    assert out.nonfinite_elements == 2 and out.elements == 6
    assert out.snr_db == MAX_SNR_DB and out.max_abs_error == 0.0
    json.dumps(out.to_dict(), allow_nan=False)


def test_report_is_json_safe_even_for_silent_references() -> None:
    acc = AccuracyAccumulator()
    acc.update({"a": np.zeros((2, 3)), "b": np.ones((2, 3))}, {"a": np.ones((2, 3)), "b": np.ones((2, 3))})

    report = acc.finish()

    assert report.output("a").snr_db == -MAX_SNR_DB and report.output("a").cosine == 0.0
    assert report.worst_snr_db() == -MAX_SNR_DB
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert json.loads(text)["samples"] == 2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_streaming_in_any_batch_split_gives_the_one_shot_result(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((sum(sizes), 6))
    cand = ref + 0.05 * rng.standard_normal(ref.shape)

    one_shot = _report_for(ref, cand)
    streamed = AccuracyAccumulator()
    start = 0
    for size in sizes:
        streamed.update({"y": ref[start : start + size]}, {"y": cand[start : start + size]})
        start += size
    report = streamed.finish()

    got = report.output("y")
    assert report.samples == sum(sizes) and report.batches == len(sizes)
    for field in (
        "cosine",
        "worst_sample_cosine",
        "snr_db",
        "max_abs_error",
        "mean_abs_error",
        "top1_agreement",
    ):
        assert getattr(got, field) == pytest.approx(getattr(one_shot, field), rel=1e-9, abs=1e-12)


def test_snr_clamps_to_the_json_safe_range() -> None:
    assert snr_db(1.0, 0.0) == MAX_SNR_DB
    assert snr_db(0.0, 1.0) == -MAX_SNR_DB
    assert snr_db(100.0, 1.0) == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("ref", "cand", "message"),
    [
        ({"y": np.zeros(2)}, {"z": np.zeros(2)}, "reference and candidate outputs differ"),
        ({"y": np.zeros((2, 3))}, {"y": np.zeros((3, 2))}, r"output 'y': reference shape \(2, 3\)"),
    ],
)
def test_mismatched_outputs_are_rejected(ref: dict, cand: dict, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        AccuracyAccumulator().update(ref, cand)


def test_batches_must_keep_the_same_outputs() -> None:
    acc = AccuracyAccumulator()
    acc.update({"y": np.zeros(2)}, {"y": np.zeros(2)})

    with pytest.raises(BadInput, match="differ from the first batch"):
        acc.update({"z": np.zeros(2)}, {"z": np.zeros(2)})


def test_finishing_without_batches_is_rejected() -> None:
    with pytest.raises(BadInput, match="no batches were evaluated"):
        AccuracyAccumulator().finish()


def test_unknown_output_name_is_rejected() -> None:
    acc = AccuracyAccumulator()
    acc.update({"y": np.zeros(2)}, {"y": np.zeros(2)})

    with pytest.raises(BadInput, match="no output named 'q'"):
        acc.finish().output("q")


def test_onnxruntime_evaluation_of_a_model_against_itself_is_exact() -> None:
    model = resnet_block_classifier()
    rng = np.random.default_rng(3)
    batches = [{"input": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(3)]

    report = evaluate_with_onnxruntime(model_bytes(model), model, batches)

    assert report.samples == 6 and report.batches == 3
    assert report.output("logits").snr_db == MAX_SNR_DB


def test_onnxruntime_evaluation_scores_an_int8_classifier() -> None:
    model = resnet_block_classifier()
    rng = np.random.default_rng(4)
    batches = [{"input": rng.standard_normal((4, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    qdq = qdq_model_from_scales(model, dict.fromkeys(tensors_to_calibrate(model), 4.0)).model

    report = evaluate_with_onnxruntime(model, qdq, batches)

    logits = report.output("logits")
    assert 0.95 < logits.cosine < 1.0
    assert 10.0 < logits.snr_db < 80.0
    assert logits.top1_agreement is not None


def test_onnxruntime_evaluation_rejects_batches_that_do_not_fit() -> None:
    model = two_input_adder()

    with pytest.raises(InvalidInferenceInput, match="does not fit the model inputs"):
        evaluate_with_onnxruntime(model, model, [{"image": np.zeros((1, 3, 8, 8), np.float32)}])


def test_onnxruntime_evaluation_rejects_a_candidate_without_the_reference_outputs() -> None:
    with pytest.raises(BadInput, match=r"candidate model lacks reference outputs \['logits'\]"):
        evaluate_with_onnxruntime(resnet_block_classifier(), two_input_adder(), [])
