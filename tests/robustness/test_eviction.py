"""Eviction and delete take what belonged only to the engine, and its build job says it is gone.

A server with a one-byte engine budget keeps only the newest engine. An INT8 ONNX Runtime build
stores a plan, a TensorRT calibration cache and the Q/DQ model it was built from; a second build
evicts it. Every one of those files must leave the disk, nothing shared (the uploaded model, the
calibration set, the other engine) may, and the first build job must say its engine was evicted
rather than hand out an engine id that is 404. Deleting the second engine is reported the same way.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import wait_for_job
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.restart.server_process import DataDir, StoredState
from tests.robustness.conftest import StartServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def json_of(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json()


def build(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    job = json_of(client.post("/v1/builds", json=body), 202)
    done = wait_for_job(client, f"/v1/builds/{job['id']}")
    assert done["status"] == "succeeded" and done["engine_state"] == "available", done
    return done


def artifact_files(data: DataDir) -> set[str]:
    return {path.name for path in (data.engines / "artifacts").glob("??/*")}


def test_an_evicted_int8_engine_takes_its_own_files_and_its_job_says_so(server_process: StartServer) -> None:
    with server_process(ENGINE_CACHE_BYTES="1") as server:
        client, data = server.client, server.data
        model_id = json_of(
            client.post(
                "/v1/models", files={"file": ("m.onnx", model_bytes(resnet_block_classifier(seed=7)))}
            ),
            201,
        )["id"]
        set_id = json_of(
            client.post(
                "/v1/calibration-sets",
                files={"file": ("c.npz", npz_bytes(input=classifier_samples(16)))},
                data={"model_id": model_id},
            ),
            201,
        )["id"]
        int8_request = {
            "model_id": model_id,
            "precision": "int8",
            "backend": "onnxruntime",
            "calibration_set_id": set_id,
            "calibration": {"method": "max", "holdout_fraction": 0.25},
        }
        int8_job = build(client, int8_request)
        int8 = json_of(client.get(f"/v1/engines/{int8_job['engine_id']}"), 200)
        qdq_model_id = int8["built_model_id"]
        assert int8["has_calibration_cache"] and qdq_model_id != model_id
        int8_state = StoredState.read(data)
        int8_plan = int8_state.engine_rows[int8["id"]]
        int8_artifacts = artifact_files(data)
        assert len(int8_artifacts) == 1 and qdq_model_id in int8_state.model_files

        fp32_job = build(client, {"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"})
        after = StoredState.read(data)
        assert set(after.engine_rows) == {fp32_job["engine_id"]}
        assert int8_plan not in after.plan_files  # the plan,
        assert artifact_files(data) == set()  # its calibration cache,
        assert (
            qdq_model_id not in after.model_files and qdq_model_id not in after.model_rows
        )  # its Q/DQ model
        assert client.get(f"/v1/models/{qdq_model_id}").status_code == 404
        assert {model_id} <= after.model_rows and model_id in after.model_files  # shared: kept
        assert after.calibration_rows == after.calibration_dirs == {set_id}

        evicted = json_of(client.get(f"/v1/builds/{int8_job['id']}"), 200)
        assert evicted["engine_state"] == "evicted"
        assert "ENGINE_SERVICE_ENGINE_CACHE_BYTES" in evicted["engine_message"]
        assert "POST /v1/builds" in evicted["engine_message"]
        assert evicted["result"]["engine_removed"]["reason"] == "evicted"

        assert client.delete(f"/v1/engines/{fp32_job['engine_id']}").status_code == 204
        deleted = json_of(client.get(f"/v1/builds/{fp32_job['id']}"), 200)
        assert deleted["engine_state"] == "deleted" and "DELETE /v1/engines" in deleted["engine_message"]
        assert StoredState.read(data).plan_files == {}

        rebuilt = build(client, int8_request)  # the same request brings the engine back
        assert rebuilt["engine_id"] == int8_job["engine_id"]
        assert json_of(client.get(f"/v1/builds/{int8_job['id']}"), 200)["engine_state"] == "available"
        assert client.get(f"/v1/models/{qdq_model_id}").status_code == 200
