"""Durability: a row lost to power failure never costs the stored file it described.

A real server stores a model, a calibration set and an engine, and is stopped. Their rows are then
deleted straight from the SQLite file, as a power loss before the commit reached disk would have
left them, and the server is started again on the same data. Start-up reconciliation must give the
model and the set their rows back (their files say what they are) and quarantine the engine plan
(its key lived only in the row), deleting none of them; the same build request then builds again.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from typing import Any

import httpx
import pytest

from service.store.quarantine import quarantined
from tests.api.conftest import wait_for_job
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.restart.server_process import DataDir, StoredState, file_digest, sha256
from tests.robustness.conftest import StartServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def json_of(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json()


def build(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    job = json_of(client.post("/v1/builds", json=body), 202)
    done = wait_for_job(client, f"/v1/builds/{job['id']}")
    assert done["status"] == "succeeded", done
    return done


def lose_rows(data: DataDir, *tables: str) -> None:
    with closing(sqlite3.connect(data.database)) as db, db:
        for table in tables:
            db.execute(f"DELETE FROM {table}")


def test_files_whose_rows_were_lost_are_recovered_or_quarantined(server_process: StartServer) -> None:
    model = model_bytes(resnet_block_classifier(seed=3))
    samples = npz_bytes(input=classifier_samples(16))
    with server_process() as server:
        model_id = json_of(server.client.post("/v1/models", files={"file": ("m.onnx", model)}), 201)["id"]
        set_id = json_of(
            server.client.post(
                "/v1/calibration-sets", files={"file": ("c.npz", samples)}, data={"model_id": model_id}
            ),
            201,
        )["id"]
        request = {"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
        engine_id = build(server.client, request)["engine_id"]
        data = server.data
    before = StoredState.read(data)
    plan_sha = before.engine_rows[engine_id]
    lose_rows(data, "engines", "models", "calibration_sets")

    with server_process() as server:
        listed = {m["id"]: m for m in json_of(server.client.get("/v1/models"), 200)}
        assert set(listed) == set(before.model_rows)  # the upload and the model the build stored
        assert {m["source"] for m in listed.values()} == {"recovered"}
        download = server.client.get(f"/v1/models/{model_id}/onnx")
        assert download.status_code == 200 and sha256(download.content) == sha256(model)
        recovered_set = json_of(server.client.get(f"/v1/calibration-sets/{set_id}"), 200)
        assert recovered_set["samples"] == 16 and recovered_set["name"] == f"recovered-{set_id[:12]}"
        assert json_of(server.client.get("/v1/engines"), 200) == []
        kept = quarantined(data.plans)
        assert [file_digest(path) for path in kept] == [plan_sha]  # moved aside, bytes intact
        assert build(server.client, request)["engine_id"] == engine_id  # the same request builds again
    after = StoredState.read(data)
    assert after.model_files.keys() == before.model_files.keys()
    assert after.calibration_dirs == before.calibration_dirs == after.calibration_rows
