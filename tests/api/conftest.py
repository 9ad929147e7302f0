"""API fixtures shared across modules: a classifier model, its calibration set, and built engines.

Builds are expensive, so each distinct engine is built once per test session and shared.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier


def wait_for_job(api: httpx.Client, path: str, timeout: float = 180) -> dict[str, Any]:
    """Poll a job resource until it leaves queued/running."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = api.get(path).json()
        if body["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def build_engine(api: httpx.Client, **request: Any) -> dict[str, Any]:
    """POST /v1/builds and wait; returns the finished build job (or the cache hit)."""
    response = api.post("/v1/builds", json=request)
    assert response.status_code in (200, 202), response.text
    if response.status_code == 200:
        return {"status": "succeeded", "engine_id": response.json()["engine_id"], "cache": "hit"}
    job = wait_for_job(api, f"/v1/builds/{response.json()['id']}")
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture(scope="session")
def classifier(api: httpx.Client) -> dict[str, str]:
    """A small ResNet-style classifier and a 64-sample calibration set for it."""
    model_id = api.post(
        "/v1/models", files={"file": ("classifier.onnx", model_bytes(resnet_block_classifier()))}
    ).json()["id"]
    set_id = api.post(
        "/v1/calibration-sets",
        files={"file": ("calib.npz", npz_bytes(input=classifier_samples(64)))},
        data={"model_id": model_id},
    ).json()["id"]
    return {"model_id": model_id, "calibration_set_id": set_id}


@pytest.fixture(scope="session")
def rtx_int8_engine(api: httpx.Client, classifier: dict[str, str]) -> dict[str, Any]:
    """The session's one TensorRT-RTX INT8 build of the classifier."""
    return build_engine(
        api,
        model_id=classifier["model_id"],
        precision="int8",
        backend="tensorrt-rtx",
        calibration_set_id=classifier["calibration_set_id"],
    )


@pytest.fixture(scope="session")
def ort_fp32_engine(api: httpx.Client, classifier: dict[str, str]) -> dict[str, Any]:
    return build_engine(api, model_id=classifier["model_id"], precision="fp32", backend="onnxruntime")
