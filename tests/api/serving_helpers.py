"""Engines and reports over real HTTP: upload, build, poll (shared by the inference and report API tests)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.model_factory import model_bytes

TERMINAL = ("succeeded", "failed", "cancelled")


def upload_model(api: httpx.Client, model: Any, name: str = "model.onnx") -> str:
    response = api.post("/v1/models", files={"file": (name, model_bytes(model))})
    assert response.status_code in (200, 201), response.text
    return str(response.json()["id"])


def wait_for(api: httpx.Client, path: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll a job resource until it reaches a terminal status."""
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = api.get(path).json()
        if body.get("status") in TERMINAL:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} still {body.get('status')} after {timeout_s} s: {body}")
        time.sleep(0.05)


def build_engine(
    api: httpx.Client, model_id: str, *, backend: str = "onnxruntime", precision: str = "fp32", **extra: Any
) -> str:
    """Request an engine and wait for its build; returns the engine id."""
    response = api.post(
        "/v1/builds", json={"model_id": model_id, "precision": precision, "backend": backend, **extra}
    )
    assert response.status_code in (200, 202), response.text
    body = response.json()
    if body["cache"] == "miss":
        build = wait_for(api, f"/v1/builds/{body['id']}")
        assert build["status"] == "succeeded", build
    return str(body["engine_id"])


def wait_for_report(api: httpx.Client, report_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    report = wait_for(api, f"/v1/reports/{report_id}", timeout_s)
    assert report["status"] == "succeeded", report
    return report
