"""Build, download, infer, benchmark and fusions through the CLI against a real server with real engines."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image
from typer.testing import Result

from service.datasets.preprocess import PreprocessSpec, image_to_array
from tests.cli.conftest import CLASSIFIER, Cli, errors_of, json_of
from tests.data_factory import classifier_samples, npz_bytes, photo
from tests.model_factory import model_bytes


def _reference(inputs: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes(CLASSIFIER), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": inputs})[0])


def test_build_shows_progress_until_the_engine_is_ready(fp32_build: Result, fp32_engine_id: str) -> None:
    progress = [line for line in fp32_build.stderr.splitlines() if re.match(r"build [0-9a-f]{12}: ", line)]

    assert fp32_build.exit_code == 0
    assert f"queued for engine {fp32_engine_id}" in fp32_build.stderr
    assert progress[-1].endswith("succeeded build 100%") or "succeeded" in progress[-1]
    assert "Engine" in fp32_build.stdout and fp32_engine_id in fp32_build.stdout
    assert "onnxruntime" in fp32_build.stdout and "fp32" in fp32_build.stdout


def test_building_the_same_engine_again_is_a_cache_hit(
    cli: Cli, classifier_id: str, fp32_engine_id: str
) -> None:
    result = json_of(cli("build", classifier_id, "--precision", "fp32", "--backend", "onnxruntime", "--json"))

    assert result["cache"] == "hit"
    assert result["engine_id"] == fp32_engine_id
    assert result["engine"]["backend"] == "onnxruntime"


def test_engines_download_writes_the_plan_verified_against_its_sha256(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    target = tmp_path / "engine.plan"

    result = cli("engines", "download", fp32_engine_id, "-o", str(target))
    engine = json_of(cli("engines", "show", fp32_engine_id, "--json"))

    assert result.exit_code == 0, result.output
    assert f"wrote {target}" in result.stdout and "sha256 verified" in result.stdout
    assert hashlib.sha256(target.read_bytes()).hexdigest() == engine["plan_sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]  # no partial file left behind


def test_engines_download_into_a_directory_uses_the_server_file_name(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    saved = json_of(cli("engines", "download", fp32_engine_id, "-o", str(tmp_path), "--json"))

    assert Path(saved["path"]).parent == tmp_path
    assert Path(saved["path"]).name.startswith(fp32_engine_id[:16])
    assert saved["verified"] is True


def test_infer_from_npy_matches_onnxruntime_on_the_same_model(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    batch = classifier_samples(3, seed=1004)
    np.save(tmp_path / "x.npy", batch)

    result = cli("infer", fp32_engine_id, "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.npz"))

    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "out.npz") as outputs:
        np.testing.assert_allclose(outputs["logits"], _reference(batch), rtol=1e-4, atol=1e-5)
    assert "logits" in result.stdout and "[3, 10]" in result.stdout


def test_infer_from_npz_matches_onnxruntime_and_prints_json(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    batch = classifier_samples(2, seed=1005)
    (tmp_path / "x.npz").write_bytes(npz_bytes(input=batch))

    result = json_of(cli("infer", fp32_engine_id, "-i", str(tmp_path / "x.npz"), "--json"))

    logits = result["outputs"]["logits"]
    assert (logits["dtype"], logits["shape"]) == ("float32", [2, 10])
    np.testing.assert_allclose(np.asarray(logits["values"]), _reference(batch), rtol=1e-4, atol=1e-5)


def test_infer_adds_the_batch_axis_to_a_single_float64_sample(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    sample = classifier_samples(1, seed=1006)[0].astype(np.float64)
    np.save(tmp_path / "one.npy", sample)

    result = json_of(cli("infer", fp32_engine_id, "-i", f"input={tmp_path / 'one.npy'}", "--json"))

    values = np.asarray(result["outputs"]["logits"]["values"])
    np.testing.assert_allclose(
        values, _reference(sample[np.newaxis].astype(np.float32)), rtol=1e-4, atol=1e-5
    )


def test_infer_preprocesses_images_like_calibration_images(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    encoded = io.BytesIO()
    Image.fromarray(photo("astronaut")).resize((64, 48)).save(encoded, format="PNG")
    (tmp_path / "a.png").write_bytes(encoded.getvalue())
    spec = PreprocessSpec.model_validate({"size": [16, 16], "mean": [0.5], "std": [0.25]})

    result = json_of(
        cli(
            "infer",
            fp32_engine_id,
            "-i",
            str(tmp_path / "a.png"),
            "-i",
            str(tmp_path / "a.png"),
            "--preprocess",
            spec.model_dump_json(),
            "--json",
        )
    )

    sample = image_to_array(encoded.getvalue(), spec)
    expected = _reference(np.stack([sample, sample]))
    np.testing.assert_allclose(
        np.asarray(result["outputs"]["logits"]["values"]), expected, rtol=1e-4, atol=1e-5
    )


def test_infer_with_an_input_name_the_engine_lacks_says_which_it_has(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", classifier_samples(1))

    result = cli("infer", fp32_engine_id, "-i", f"image={tmp_path / 'x.npy'}")

    (error,) = errors_of(result)
    assert result.exit_code == 1
    assert "no input 'image'" in error and "['input']" in error


def test_infer_with_a_wrong_shape_prints_the_server_reason(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))

    result = cli("infer", fp32_engine_id, "-i", str(tmp_path / "x.npy"))

    (error,) = errors_of(result)
    assert result.exit_code == 1
    assert "input" in error and "8" in error


def test_benchmark_prints_percentiles_throughput_backend_and_device(cli: Cli, fp32_engine_id: str) -> None:
    table = cli("benchmark", fp32_engine_id, "--batch-sizes", "1,2", "--iterations", "5", "--warmup", "1")

    assert table.exit_code == 0, table.output
    for column in ("p50 ms", "p90 ms", "p95 ms", "p99 ms", "inferences/s"):
        assert column in table.stdout
    assert "onnxruntime" in table.stdout and "measured on" in table.stdout
    rows = [line for line in table.stdout.splitlines() if re.match(r"^\W*[12]\W", line)]
    assert len(rows) == 2


def test_benchmark_json_carries_the_report(cli: Cli, fp32_engine_id: str) -> None:
    report = json_of(cli("benchmark", fp32_engine_id, "--iterations", "3", "--warmup", "0", "--json"))

    (result,) = report["results"]
    assert result["batch_size"] == 1
    assert result["latency_ms"]["count"] == 3
    assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    assert report["measured_on"]["backend"] == "onnxruntime"
    assert report["report_id"]


def test_fusions_of_a_model_list_the_static_patterns(cli: Cli, classifier_id: str) -> None:
    table = cli("fusions", classifier_id)
    report = json_of(cli("fusions", classifier_id, "--json"))

    assert table.exit_code == 0
    assert "conv_bn_relu" in table.stdout and "conv_bn_add" in table.stdout
    assert {p["kind"] for p in report["patterns"]} >= {"conv_bn_relu", "conv_bn_add"}


def test_fusions_of_an_engine_say_what_the_build_fused(cli: Cli, fp32_engine_id: str) -> None:
    report = json_of(cli("fusions", "--engine", fp32_engine_id, "--json"))
    table = cli("fusions", "--engine", fp32_engine_id)

    assert report["engine_id"] == fp32_engine_id
    assert report["patterns"] and all("status" in p for p in report["patterns"])
    assert "Fusions in the engine" in table.stdout


@pytest.mark.parametrize("args", [(), ("MODEL", "--engine", "ENGINE")])
def test_fusions_needs_exactly_one_of_model_and_engine(cli: Cli, args: tuple[str, ...]) -> None:
    result = cli("fusions", *args)

    assert result.exit_code == 1
    assert "Give a MODEL id or --engine ID" in errors_of(result)[0]


def test_an_int8_build_without_waiting_is_picked_up_by_builds_wait(
    cli: Cli, classifier_id: str, tmp_path: Path
) -> None:
    (tmp_path / "calib.npz").write_bytes(npz_bytes(input=classifier_samples(16, seed=1007)))
    calib = json_of(cli("calib", "upload", str(tmp_path / "calib.npz"), "--model", classifier_id, "--json"))

    started = json_of(
        cli(
            "build",
            classifier_id,
            "--precision",
            "int8",
            "--backend",
            "onnxruntime",
            "--calib",
            calib["id"],
            "--no-wait",
            "--json",
        )
    )
    waited = cli("builds", "wait", started["build_id"]) if started["cache"] == "miss" else None

    assert started["engine"] is None or started["cache"] == "hit"
    if waited is not None:
        assert waited.exit_code == 0, waited.output
        assert "succeeded" in waited.stdout
    engine = json_of(cli("engines", "show", started["engine_id"], "--json"))
    assert engine["precision"] == "int8" and engine["calibration_set_id"] == calib["id"]


def test_a_benchmark_started_without_waiting_is_shown_and_downloaded_from_reports(
    cli: Cli, fp32_engine_id: str, tmp_path: Path
) -> None:
    started = json_of(
        cli("benchmark", fp32_engine_id, "--iterations", "3", "--warmup", "0", "--no-wait", "--json")
    )

    shown = cli("reports", "show", started["id"], "--wait")
    html = json_of(cli("reports", "download", started["id"], "-o", str(tmp_path), "--json"))
    png = cli("reports", "download", started["id"], "--format", "png", "-o", str(tmp_path / "plot.png"))

    assert shown.exit_code == 0, shown.output
    assert "p99 ms" in shown.stdout and "measured on" in shown.stdout
    assert Path(html["path"]).parent == tmp_path and "<html" in Path(html["path"]).read_text().lower()
    assert png.exit_code == 0, png.output
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_build_passes_the_device_selector_and_prints_why_no_target_matches(
    cli: Cli, classifier_id: str
) -> None:
    result = cli(
        "build", classifier_id, "--precision", "fp32", "--backend", "onnxruntime", "--device", "sm_999"
    )
    assert result.exit_code != 0
    errors = errors_of(result)
    assert errors and "matches device 'sm_999'" in errors[0] and "onnxruntime" in errors[0]
