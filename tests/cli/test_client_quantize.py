"""`engine-service quantize` and the quantizations group against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import Cli, errors_of, json_of
from tests.data_factory import classifier_samples, npz_bytes


@pytest.fixture(scope="module")
def calib_id(cli_module: Cli, classifier_id: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("quantize") / "calib.npz"
    path.write_bytes(npz_bytes(input=classifier_samples(20, seed=1030)))
    return str(json_of(cli_module("calib", "upload", str(path), "--model", classifier_id, "--json"))["id"])


def test_quantize_prints_the_qdq_model_accuracy_and_layer_sensitivity(
    cli: Cli, classifier_id: str, calib_id: str
) -> None:
    result = cli("quantize", classifier_id, "--calib", calib_id, "--sensitivity", "rank")

    assert result.exit_code == 0, result.output
    for title in (
        "Quantization",
        "Accuracy vs FP32 (held-out samples)",
        "Accuracy per output",
        "Layer sensitivity",
    ):
        assert title in result.stdout
    assert "stem_conv" in result.stdout
    assert "quantization" in result.stderr and "succeeded" in result.stderr


def test_quantize_json_names_the_qdq_model_and_its_calibration_cache_downloads(
    cli: Cli, classifier_id: str, calib_id: str, tmp_path: Path
) -> None:
    job = json_of(cli("quantize", classifier_id, "--calib", calib_id, "--method", "max", "--json"))
    saved = json_of(
        cli("quantizations", "calibration-cache", job["id"], "-o", str(tmp_path / "calib.cache"), "--json")
    )
    model = json_of(cli("models", "show", job["qdq_model_id"], "--json"))

    assert job["status"] == "succeeded" and job["result"]["method"] == "max"
    assert model["quantization"]["explicit"] is True and model["parent_id"] == classifier_id
    assert saved["verified"] is True and (tmp_path / "calib.cache").stat().st_size > 0


def test_quantize_auto_sensitivity_without_a_bound_is_refused_with_the_reason(
    cli: Cli, classifier_id: str, calib_id: str
) -> None:
    result = cli("quantize", classifier_id, "--calib", calib_id, "--sensitivity", "auto")

    (error,) = errors_of(result)
    assert result.exit_code == 1
    assert "min_snr_db" in error


def test_quantize_takes_a_task_and_an_accuracy_target_and_says_loudly_when_it_is_missed(
    cli: Cli, classifier_id: str, calib_id: str
) -> None:
    met = cli("quantize", classifier_id, "--calib", calib_id, "--task", "classification",
              "--accuracy-target", "top1_agreement=0.1", "--json")  # fmt: skip
    job = json_of(met)
    assert job["target_met"] is True and job["result"]["task"]["kind"] == "classification"
    assert job["result"]["accuracy_targets"] == [{"metric": "top1_agreement", "min": 0.1}]
    assert "BELOW its accuracy target" not in met.stderr

    missed = cli("quantize", classifier_id, "--calib", calib_id, "--accuracy-target", "snr_db=200", "--json")
    assert missed.exit_code == 0, missed.output
    assert json_of(missed)["target_met"] is False
    assert "BELOW its accuracy target" in missed.stderr and "misses the accuracy target" in missed.stderr


def test_a_malformed_accuracy_target_is_refused_before_anything_runs(
    cli: Cli, classifier_id: str, calib_id: str
) -> None:
    result = cli("quantize", classifier_id, "--calib", calib_id, "--accuracy-target", "top1")
    assert result.exit_code != 0 and any("METRIC=MIN" in line for line in errors_of(result))


def test_build_precision_auto_says_what_it_chose_and_why(cli: Cli, classifier_id: str, calib_id: str) -> None:
    built = cli(
        "build", classifier_id, "--precision", "auto", "--calib", calib_id, "--backend", "onnxruntime"
    )

    assert built.exit_code == 0, built.output
    assert "queued for precision auto" in built.stderr and "precision auto chose " in built.stderr

    again = cli("build", classifier_id, "--precision", "auto", "--calib", calib_id,
                "--backend", "onnxruntime", "--json")  # fmt: skip
    outcome = json_of(again)
    choice = outcome["precision_choice"]
    assert outcome["cache"] == "hit" and outcome["engine"]["precision"] == choice["chosen"]
    assert f"precision auto chose {choice['chosen']}: {choice['reason']}" in built.stderr
