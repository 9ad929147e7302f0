"""Liveness and readiness over real HTTP."""

from __future__ import annotations

import httpx


def test_healthz_answers(api: httpx.Client) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}


def test_readyz_names_every_backend_and_says_why_one_cannot_be_used(api: httpx.Client) -> None:
    response = api.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready" and body["storage_writable"] is True
    by_name = {b["name"]: b for b in body["backends"]}
    assert set(by_name) == {"tensorrt", "tensorrt-rtx", "onnxruntime"}
    assert by_name["onnxruntime"]["can_build"] and by_name["onnxruntime"]["can_run"]
    assert by_name["tensorrt-rtx"]["can_build"] and by_name["tensorrt-rtx"]["version"]
    for backend in body["backends"]:
        if not (backend["can_build"] and backend["can_run"]):
            assert backend["reason"], backend  # a backend that cannot do something says why


def test_readyz_states_what_is_verified_where(api: httpx.Client) -> None:
    statement = api.get("/readyz").json()["verification"]
    assert "TensorRT-RTX builds: verified on CPU here" in statement
    assert "enterprise TensorRT path" in statement and "verified by review and CPU tests only" in statement
