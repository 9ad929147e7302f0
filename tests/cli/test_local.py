"""`engine-service local build`: the real app in-process, driven by the same calls as the client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.cli.conftest import errors_of, invoke, json_of
from tests.data_factory import classifier_samples, npz_bytes, photo_zip
from tests.model_factory import model_bytes, resnet_block_classifier

PREPROCESS = '{"size": [16, 16], "resize": "shorter_side_center_crop"}'


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = tmp_path / "classifier.onnx"
    model.write_bytes(model_bytes(resnet_block_classifier(seed=1010)))
    images = tmp_path / "photos.zip"
    images.write_bytes(photo_zip(12, max_side=48))
    out = tmp_path / "out"
    out.mkdir()
    return model, images, out


def test_local_build_writes_the_engine_and_a_report_and_says_where(tmp_path: Path) -> None:
    model, images, out = _files(tmp_path)
    data_dir = tmp_path / "data"
    held_out = tmp_path / "held-out.zip"
    held_out.write_bytes(photo_zip(5, max_side=40))

    result = invoke(
        "local",
        "build",
        str(model),
        "--precision",
        "int8",
        "--backend",
        "onnxruntime",
        "--calib",
        str(images),
        "--eval",
        str(held_out),
        "--preprocess",
        PREPROCESS,
        "-o",
        str(out),
        "--data-dir",
        str(data_dir),
    )

    assert result.exit_code == 0, result.output
    (engine_file,) = [p for p in out.iterdir() if not p.name.endswith(".report.json")]
    report_file = out / f"{engine_file.stem}.report.json"
    report = json.loads(report_file.read_text())
    assert f"engine     {engine_file}" in result.stdout
    assert f"report     {report_file}" in result.stdout
    assert f"data dir   {data_dir.resolve()}" in result.stdout
    assert hashlib.sha256(engine_file.read_bytes()).hexdigest() == report["engine"]["plan_sha256"]
    assert report["engine_file"]["sha256"] == report["engine"]["plan_sha256"]
    assert report["engine"]["precision"] == "int8" and report["engine"]["backend"] == "onnxruntime"
    assert report["model"]["id"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert report["calibration_set"]["samples"] == 12
    assert report["calibration_set"]["inputs"][0]["shape"] == [3, 16, 16]
    assert report["eval_set"]["samples"] == 5
    assert report["engine"]["accuracy"]["samples"] == 5
    assert report["fusions"]["patterns"] and report["layers"]["engine_id"] == report["engine"]["id"]
    assert (data_dir / "engine_service.db").is_file()


def test_a_second_local_build_is_a_cache_hit_in_the_same_data_dir(tmp_path: Path) -> None:
    model, _, out = _files(tmp_path)
    args = (
        "local",
        "build",
        str(model),
        "--precision",
        "fp32",
        "--backend",
        "onnxruntime",
        "--data-dir",
        str(tmp_path / "data"),
        "--json",
    )

    first = json_of(invoke(*args, "-o", str(out / "first.onnx"), "--report", str(tmp_path / "first.json")))
    second = json_of(invoke(*args, "-o", str(out / "second.onnx")))

    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert first["engine_id"] == second["engine_id"]
    assert first["report_path"] == str(tmp_path / "first.json")
    assert second["report_path"] == str(out / "second.report.json")
    assert (out / "first.onnx").read_bytes() == (out / "second.onnx").read_bytes()


def test_a_local_build_of_an_invalid_model_reports_why_and_writes_nothing(tmp_path: Path) -> None:
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"not an onnx model")
    out = tmp_path / "out"
    out.mkdir()

    result = invoke(
        "local",
        "build",
        str(model),
        "--precision",
        "fp32",
        "-o",
        str(out),
        "--data-dir",
        str(tmp_path / "data"),
    )

    (error,) = errors_of(result)
    assert result.exit_code == 1
    assert "ONNX" in error or "onnx" in error
    assert list(out.iterdir()) == []


def test_a_local_service_that_cannot_start_says_why(tmp_path: Path) -> None:
    model, _, _ = _files(tmp_path)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the data directory should be")

    result = invoke("local", "build", str(model), "--precision", "fp32", "--data-dir", str(blocked))

    (error,) = errors_of(result)
    assert result.exit_code == 1
    assert error.startswith("error: The in-process service failed to start:")


def test_a_local_int8_tensorrt_rtx_build_from_photos_is_an_int8_engine(tmp_path: Path) -> None:
    from service.backends.registry import get_backend

    availability = get_backend("tensorrt-rtx").available()
    if not availability.can_build:
        pytest.skip(f"TensorRT-RTX cannot build here: {availability.reason}")
    model, images, out = _files(tmp_path)

    result = json_of(
        invoke(
            "local",
            "build",
            str(model),
            "--precision",
            "int8",
            "--backend",
            "tensorrt-rtx",
            "--calib",
            str(images),
            "--preprocess",
            PREPROCESS,
            "-o",
            str(out / "engine.plan"),
            "--data-dir",
            str(tmp_path / "data"),
            "--json",
        )
    )

    report = json.loads(Path(result["report_path"]).read_text())
    assert Path(result["engine_path"]) == out / "engine.plan"
    assert (out / "engine.plan").stat().st_size == result["engine_bytes"] > 0
    assert report["engine"]["backend"] == "tensorrt-rtx"
    assert report["engine"]["layer_counts"]["int8"] > 0
    assert any(layer["precision"] == "int8" for layer in report["layers"]["layers"])


def _build_args(model: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "local", "build", str(model), "--precision", "int8", "--backend", "onnxruntime",
        "-o", str(out), "--data-dir", str(tmp_path / "data"), "--json", *extra,
    ]  # fmt: skip


def test_an_image_calibration_archive_and_an_npz_eval_set_mix_with_one_preprocess(tmp_path: Path) -> None:
    model, images, out = _files(tmp_path)
    held_out = tmp_path / "held-out.npz"
    held_out.write_bytes(npz_bytes(input=classifier_samples(6, seed=1011)))

    result = invoke(*_build_args(model, out, tmp_path, "--calib", str(images), "--eval", str(held_out),
                                 "--preprocess", PREPROCESS))  # fmt: skip

    report = json.loads(Path(json_of(result)["report_path"]).read_text())
    assert report["calibration_set"]["format"] != report["eval_set"]["format"]
    assert report["calibration_set"]["preprocess"]["resize"] == "shorter_side_center_crop"
    assert report["eval_set"]["preprocess"] is None and report["eval_set"]["samples"] == 6


def test_each_set_takes_its_own_preprocessing(tmp_path: Path) -> None:
    model, images, out = _files(tmp_path)
    held_out = tmp_path / "held-out.zip"
    held_out.write_bytes(photo_zip(4, max_side=40))
    stretch = '{"size": [16, 16]}'

    result = invoke(*_build_args(model, out, tmp_path, "--calib", str(images), "--eval", str(held_out),
                                 "--calib-preprocess", PREPROCESS, "--eval-preprocess", stretch))  # fmt: skip

    report = json.loads(Path(json_of(result)["report_path"]).read_text())
    assert report["calibration_set"]["preprocess"]["resize"] == "shorter_side_center_crop"
    assert report["eval_set"]["preprocess"]["resize"] == "stretch"


def test_a_per_set_preprocess_on_an_array_file_is_refused_with_the_server_reason(tmp_path: Path) -> None:
    model, images, out = _files(tmp_path)
    held_out = tmp_path / "held-out.npz"
    held_out.write_bytes(npz_bytes(input=classifier_samples(4, seed=1012)))

    result = invoke(*_build_args(model, out, tmp_path, "--calib", str(images), "--preprocess", PREPROCESS,
                                 "--eval", str(held_out), "--eval-preprocess", PREPROCESS))  # fmt: skip

    assert result.exit_code == 1
    assert any("only applies to image archives" in line for line in errors_of(result))
