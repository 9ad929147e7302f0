"""Client commands for models and calibration sets against a real server, and how failures read."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import numpy as np

from tests.cli.conftest import Cli, errors_of, invoke, json_of
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.server import free_port


def test_models_upload_prints_the_id_and_show_reads_the_same_record(cli: Cli, tmp_path: Path) -> None:
    data = model_bytes(resnet_block_classifier(seed=1002))
    path = tmp_path / "fresh.onnx"
    path.write_bytes(data)

    uploaded = cli("models", "upload", str(path), "--name", "fresh-classifier")
    shown = json_of(cli("models", "show", hashlib.sha256(data).hexdigest(), "--json"))

    assert uploaded.exit_code == 0, uploaded.output
    assert f"as model {hashlib.sha256(data).hexdigest()}" in uploaded.stderr
    assert "fresh-classifier" in uploaded.stdout and "logits" in uploaded.stdout
    assert shown["id"] == hashlib.sha256(data).hexdigest()
    assert shown["name"] == "fresh-classifier"
    assert shown["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["N", 3, 16, 16]}]


def test_uploading_the_same_model_again_says_it_was_already_there(cli: Cli, classifier_file: Path) -> None:
    first = json_of(cli("models", "upload", str(classifier_file), "--json"))
    again = cli("models", "upload", str(classifier_file))

    assert again.exit_code == 0
    assert f"as model {first['id']} (already there)" in again.stderr


def test_models_list_shows_short_ids_in_a_table_and_full_records_as_json(
    cli: Cli, classifier_id: str
) -> None:
    table = cli("models", "list")
    records = json_of(cli("models", "list", "--json"))

    assert table.exit_code == 0
    assert classifier_id[:16] in table.stdout and classifier_id not in table.stdout
    assert classifier_id in [record["id"] for record in records]


def test_models_download_writes_the_exact_bytes(cli: Cli, classifier_id: str, tmp_path: Path) -> None:
    result = json_of(cli("models", "download", classifier_id, "-o", str(tmp_path / "copy.onnx"), "--json"))

    assert result["verified"] is True
    assert hashlib.sha256((tmp_path / "copy.onnx").read_bytes()).hexdigest() == classifier_id


def test_calib_upload_of_an_npz_is_checked_against_the_model(
    cli: Cli, classifier_id: str, tmp_path: Path
) -> None:
    path = tmp_path / "calib.npz"
    path.write_bytes(npz_bytes(input=classifier_samples(12, seed=1003)))

    record = json_of(cli("calib", "upload", str(path), "--model", classifier_id, "--json"))
    table = cli("calib", "show", record["id"])

    assert record["samples"] == 12
    assert record["format"] == "npz"
    assert record["inputs"][0]["name"] == "input"
    assert record["inputs"][0]["shape"] == [3, 16, 16]
    assert table.exit_code == 0
    assert record["id"] in table.stdout and "12" in table.stdout


def test_calib_upload_that_does_not_fit_the_model_prints_the_server_reason(
    cli: Cli, classifier_id: str, tmp_path: Path
) -> None:
    path = tmp_path / "wrong.npz"
    path.write_bytes(npz_bytes(input=np.zeros((4, 3, 8, 8), np.float32)))

    result = cli("calib", "upload", str(path), "--model", classifier_id)

    (error,) = errors_of(result)
    assert result.exit_code == 1
    assert "'input'" in error and "16 in the model but 8 in the data" in error
    assert result.stdout == ""


def test_an_unknown_id_prints_the_server_message_and_exits_non_zero(cli: Cli) -> None:
    missing = "0" * 64

    shown = cli("models", "show", missing)
    engine = cli("engines", "download", missing, "--json")

    assert shown.exit_code == 1
    assert missing in errors_of(shown)[0]
    assert engine.exit_code == 1 and missing in errors_of(engine)[0]
    assert engine.stdout == ""


def test_a_refused_connection_says_how_to_start_a_server() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    result = invoke("models", "list", "--url", url)

    (error,) = errors_of(result)
    assert result.exit_code == 3
    assert error.startswith(f"error: Cannot reach the engine service at {url}")
    assert "engine-service serve" in error and "ENGINE_SERVICE_URL" in error


def test_the_url_comes_from_the_environment_when_not_given(base_url: str, classifier_id: str) -> None:
    from typer.testing import CliRunner

    from service.cli.main import app

    result = CliRunner().invoke(
        app, ["models", "show", classifier_id, "--json"], env={"ENGINE_SERVICE_URL": base_url}
    )

    assert result.exit_code == 0, result.output
    assert '"id": "' + classifier_id in result.stdout


def test_an_api_key_is_required_and_sent_when_the_server_asks_for_one(
    start_server: Callable[..., AbstractContextManager[httpx.Client]],
) -> None:
    token = "cli-test-key-0123456789abcdef"
    with start_server(auth_enabled=True, bootstrap_api_key=token) as client:
        url = str(client.base_url)
        refused = invoke("models", "list", "--url", url)
        accepted = invoke("models", "list", "--json", "--url", url, "--api-key", token)

    (error,) = errors_of(refused)
    assert refused.exit_code == 1
    assert "--api-key" in error and "ENGINE_SERVICE_API_KEY" in error
    assert json_of(accepted) == []
