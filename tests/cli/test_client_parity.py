"""CLI parity: one option name per concept, and every report the API makes is reachable from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli.main import app
from tests.cli.conftest import Cli, errors_of, json_of
from tests.data_factory import classifier_samples, npz_bytes


@pytest.fixture(scope="module")
def calib_id(cli_module: Cli, classifier_id: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("parity") / "calib.npz"
    path.write_bytes(npz_bytes(input=classifier_samples(12, seed=1040)))
    return str(json_of(cli_module("calib", "upload", str(path), "--model", classifier_id, "--json"))["id"])


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [("build",), ("quantize",), ("local", "build")], ids=" ".join)
def test_layers_kept_out_of_int8_are_named_keep_everywhere(command: tuple[str, ...]) -> None:
    text = _help(*command)
    assert "--keep" in text and "--skip" not in text


def test_quantize_keep_and_target_reach_the_quantization(cli: Cli, classifier_id: str, calib_id: str) -> None:
    job = json_of(
        cli(
            "quantize", classifier_id, "--calib", calib_id, "--method", "max",
            "--keep", "first", "--target", "onnxruntime", "--json",
        )
    )  # fmt: skip
    assert job["status"] == "succeeded", job
    assert job["params"]["target"] == "onnxruntime" and job["result"]["target"] == "onnxruntime"
    assert job["params"]["skip"] == ["first"] and job["result"]["kept_layers"]


def test_quantize_skip_still_works_and_says_it_is_now_keep(
    cli: Cli, classifier_id: str, calib_id: str
) -> None:
    result = cli(
        "quantize", classifier_id, "--calib", calib_id, "--method", "max", "--skip", "last", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["params"]["skip"] == ["last"]
    assert "--skip is deprecated" in result.stderr and "--keep" in result.stderr


def test_quantize_refuses_an_unknown_target(cli: Cli, classifier_id: str, calib_id: str) -> None:
    result = cli("quantize", classifier_id, "--calib", calib_id, "--target", "tflite")
    assert result.exit_code == 2


def test_evaluate_prints_accuracy_against_fp32_and_the_report_reads_back(
    cli: Cli, fp32_engine_id: str, calib_id: str, tmp_path: Path
) -> None:
    result = cli("evaluate", fp32_engine_id[:12], "--eval", calib_id, "--max-samples", "4")
    assert result.exit_code == 0, result.output
    assert "Evaluation" in result.stdout and "Accuracy vs FP32" in result.stdout
    report = json_of(cli("evaluate", fp32_engine_id, "--eval", calib_id, "--max-samples", "4", "--json"))
    assert report["kind"] == "evaluation" and report["samples"] == 4
    shown = cli("reports", "show", report["report_id"])
    assert shown.exit_code == 0 and "Accuracy vs FP32" in shown.stdout
    saved = json_of(cli("reports", "download", report["report_id"], "-o", str(tmp_path / "e.html"), "--json"))
    assert Path(saved["path"]).read_text().lstrip().startswith("<!DOCTYPE html>")


def test_compare_prints_engines_side_by_side(
    cli: Cli, classifier_id: str, fp32_engine_id: str, calib_id: str
) -> None:
    int8 = json_of(
        cli(
            "build",
            classifier_id,
            "--precision",
            "int8",
            "--calib",
            calib_id,
            "--backend",
            "onnxruntime",
            "--json",
        )
    )["engine_id"]
    result = cli(
        "compare", fp32_engine_id, int8, "--batch-sizes", "1,2", "--iterations", "3", "--warmup", "1"
    )
    assert result.exit_code == 0, result.output
    assert "Comparison" in result.stdout and "int8" in result.stdout and "fp32" in result.stdout
    report = json_of(
        cli("compare", fp32_engine_id[:8], int8[:8], "--iterations", "3", "--warmup", "1", "--json")
    )
    assert report["kind"] == "comparison"
    assert {e["engine_id"] for e in report["engines"]} == {fp32_engine_id, int8}
    assert report["engines"][0]["latency_ms"]["1"]["p50"] > 0


def test_compare_needs_two_engines(cli: Cli, fp32_engine_id: str) -> None:
    result = cli("compare", fp32_engine_id, "--iterations", "3")
    assert result.exit_code == 1
    assert errors_of(result)


def test_fusion_tables_use_one_vocabulary_for_the_model_and_the_engine(
    cli: Cli, base_url: str, classifier_id: str, fp32_engine_id: str
) -> None:
    wide = {"COLUMNS": "400"}
    static = CliRunner().invoke(app, ["fusions", classifier_id, "--url", base_url], env=wide)
    engine = CliRunner().invoke(app, ["fusions", "--engine", fp32_engine_id, "--url", base_url], env=wide)
    for result in (static, engine):
        assert result.exit_code == 0, result.output
        header = next(line for line in result.stdout.splitlines() if "patterns" in line and "fused" in line)
        assert [word for word in ("fused", "epilogue", "separate", "blocked") if word in header] == [
            "fused", "epilogue", "separate", "blocked"
        ]  # fmt: skip
    assert "expected in INT8" in static.stdout
    report = json_of(cli("fusions", classifier_id, "--json"))
    assert {p["expected"] for p in report["patterns"]} <= {"fused", "epilogue", "blocked"}
    verified = json_of(cli("fusions", "--engine", fp32_engine_id, "--json"))
    assert {p["status"] for p in verified["patterns"]} <= {"fused", "epilogue", "separate", "blocked"}
    assert all("expected" in p and "reason" in p for p in verified["patterns"])
