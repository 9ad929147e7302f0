"""The 16-character ids the CLI prints work as input to every command that takes an id."""

from __future__ import annotations

from pathlib import Path

from tests.cli.conftest import Cli, errors_of, json_of


def test_the_printed_short_ids_work_for_show_fusions_and_download(
    cli: Cli, classifier_id: str, fp32_engine_id: str, tmp_path: Path
) -> None:
    model, engine = classifier_id[:16], fp32_engine_id[:16]
    assert json_of(cli("models", "show", model, "--json"))["id"] == classifier_id
    assert json_of(cli("fusions", model, "--json"))["model_id"] == classifier_id
    assert json_of(cli("engines", "show", engine, "--json"))["id"] == fp32_engine_id
    assert json_of(cli("fusions", "--engine", engine, "--json"))["engine_id"] == fp32_engine_id
    listed = json_of(cli("engines", "list", "--model", classifier_id[:8], "--json"))
    assert fp32_engine_id in [e["id"] for e in listed]
    downloaded = json_of(cli("engines", "download", engine, "-o", str(tmp_path / "e.onnx"), "--json"))
    assert downloaded["verified"] is True


def test_a_build_by_short_model_id_is_the_same_engine_as_by_the_full_id(
    cli: Cli, classifier_id: str, fp32_engine_id: str
) -> None:
    result = cli("build", classifier_id[:8], "--precision", "fp32", "--backend", "onnxruntime", "--json")
    assert json_of(result)["engine_id"] == fp32_engine_id


def test_a_too_short_id_is_refused_with_the_server_message(cli: Cli, classifier_id: str) -> None:
    result = cli("models", "show", classifier_id[:7])
    assert result.exit_code != 0
    assert any("No model with id" in line for line in errors_of(result))
