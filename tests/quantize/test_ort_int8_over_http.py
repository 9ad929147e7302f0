"""INT8 for ONNX Runtime over the real HTTP API: builds and quantization jobs get ONNX Runtime's placement."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import build_engine, wait_for_job
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier


@pytest.fixture(scope="module")
def uploaded(api: httpx.Client) -> dict[str, str]:
    """The factory classifier (a seed of its own, so no other module's cached engine is reused) and data."""
    model = resnet_block_classifier(seed=13)
    model_id = api.post("/v1/models", files={"file": ("ort-int8.onnx", model_bytes(model))}).json()["id"]
    set_id = api.post(
        "/v1/calibration-sets",
        files={"file": ("calib.npz", npz_bytes(input=classifier_samples(64, seed=13)))},
        data={"model_id": model_id},
    ).json()["id"]
    return {"model_id": model_id, "calibration_set_id": set_id}


def test_int8_onnxruntime_build_runs_integer_kernels(api: httpx.Client, uploaded: dict[str, str]) -> None:
    job = build_engine(api, **uploaded, precision="int8", backend="onnxruntime")

    engine = api.get(f"/v1/engines/{job['engine_id']}").json()

    assert engine["backend"] == "onnxruntime" and engine["precision"] == "int8"
    assert engine["layer_counts"]["int8"] >= 8  # 4 QLinearConv, 2 QGemm, QLinearAdd, QLinearGlobalAveragePool
    assert engine["layer_counts"]["fp32"] == 0
    assert engine["accuracy"]["outputs"][0]["cosine"] > 0.99
    layers = api.get(f"/v1/engines/{job['engine_id']}/layers").json()
    types = {layer["type"] for layer in layers["layers"]}
    assert {"QLinearConv", "QGemm"} <= types and not {"FusedConv", "Conv", "FusedGemm"} & types


def _quantize(api: httpx.Client, **body: Any) -> dict[str, Any]:
    response = api.post("/v1/quantizations", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(api, f"/v1/quantizations/{response.json()['id']}")
    assert job["status"] == "succeeded", job
    return job


def test_quantization_job_places_qdq_for_onnxruntime_on_request(
    api: httpx.Client, uploaded: dict[str, str]
) -> None:
    job = _quantize(api, **uploaded, target="onnxruntime")

    result = job["result"]
    assert result["target"] == "onnxruntime"
    assert result["accuracy"]["outputs"][0]["cosine"] > 0.99
    assert result["calibrated_tensors"] > result["quantized_nodes"] == 6  # output ranges are calibrated too
    built = build_engine(api, model_id=job["qdq_model_id"], precision="int8", backend="onnxruntime")
    engine = api.get(f"/v1/engines/{built['engine_id']}").json()
    assert engine["layer_counts"]["int8"] >= 8


def test_quantization_target_defaults_to_tensorrt_and_rejects_unknown_ones(
    api: httpx.Client, uploaded: dict[str, str]
) -> None:
    default = _quantize(api, **uploaded)["result"]
    assert default["target"] == "tensorrt"
    assert default["calibrated_tensors"] == 6  # the TensorRT placement: layer inputs and the residual only

    response = api.post("/v1/quantizations", json={**uploaded, "target": "openvino"})

    assert response.status_code == 422
    assert "target" in response.text
