"""Restart safety: SIGKILL a real server mid-calibration, mid-build and mid-upload, start it again.

Each test runs ``python -m service.cli.main serve`` as a subprocess on its own data directory, kills
it with SIGKILL at a chosen moment (seen through the job's ``phase``, or a staged upload appearing on
disk), starts a new process on the same directory and checks what a client and the disk see:

* the interrupted job is ``failed`` with a reason that says the server stopped and how to retry, and
  the same request sent again succeeds;
* every listed engine's plan downloads, hashes to its X-Content-SHA256, and the engines index and
  the plan files agree both ways (read straight from SQLite and the folders);
* only complete models and calibration sets are listed, each matching its digest, and no ``.tmp-*``
  file or directory is left anywhere under the data directory.

Timing-robust by construction: phases are polled every 20 ms with generous deadlines, and the
workloads are sized so that the phases being waited for last seconds on a loaded 2-core machine.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ONNX_ZOO_DIR
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.restart.server_process import (
    FINAL,
    DataDir,
    ServerProcess,
    StoredState,
    file_digest,
    poll,
    running,
    sha256,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INTERRUPTED = re.compile(r"server stopped while this job was running.*again to retry", re.DOTALL)
# Calibrating this classifier on these samples takes seconds on two cores (the phase to kill in).
CLASSIFIER_CHANNELS, CLASSIFIER_SIZE = 32, 64
CALIBRATION_SAMPLES = 192


def json_of(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    return response.json()


def upload_classifier_and_samples(client: httpx.Client) -> tuple[str, str]:
    model = json_of(
        client.post(
            "/v1/models",
            files={
                "file": (
                    "classifier.onnx",
                    model_bytes(resnet_block_classifier(channels=CLASSIFIER_CHANNELS, size=CLASSIFIER_SIZE)),
                )
            },
        ),
        201,
    )
    samples = classifier_samples(CALIBRATION_SAMPLES, size=CLASSIFIER_SIZE)
    calibration = json_of(
        client.post(
            "/v1/calibration-sets",
            files={"file": ("samples.npz", npz_bytes(input=samples))},
            data={"model_id": model["id"]},
        ),
        201,
    )
    return model["id"], calibration["id"]


def assert_storage_consistent(server: ServerProcess) -> None:
    """What is listed is complete and verified; the index and the files agree; no temporaries remain."""
    client, state = server.client, StoredState.read(server.data)
    assert state.temporaries == (), f"temporaries survived the restart: {state.temporaries}"

    # Engines: every row has its plan file, every plan file has a row, and each file matches its name.
    assert set(state.engine_rows.values()) == set(state.plan_files), (state.engine_rows, state.plan_files)
    for digest, path in state.plan_files.items():
        assert file_digest(path) == digest, f"{path} does not match its digest"
    listed = json_of(client.get("/v1/engines"), 200)
    assert {engine["id"] for engine in listed} == set(state.engine_rows)
    for engine in listed:
        plan = client.get(f"/v1/engines/{engine['id']}/plan")
        assert plan.status_code == 200, plan.text
        assert sha256(plan.content) == plan.headers["X-Content-SHA256"] == engine["plan_sha256"]

    # Models: each listed model downloads whole; rows and blob files are the same set.
    models = json_of(client.get("/v1/models"), 200)
    assert {model["id"] for model in models} == state.model_rows == set(state.model_files)
    for model in models:
        onnx_file = client.get(f"/v1/models/{model['id']}/onnx")
        assert onnx_file.status_code == 200
        assert sha256(onnx_file.content) == onnx_file.headers["X-Content-SHA256"] == model["id"]

    # Calibration sets: rows and stored directories are the same set.
    sets = json_of(client.get("/v1/calibration-sets"), 200)
    assert {item["id"] for item in sets} == state.calibration_rows == state.calibration_dirs

    # Jobs: these tests check between jobs, so a row still "running" can only be one the kill left.
    running_jobs = [job for job, status in state.job_status.items() if status == "running"]
    assert running_jobs == [], f"jobs still marked running: {running_jobs}"


def assert_interrupted(job: dict[str, Any]) -> None:
    assert job["status"] == "failed", job
    assert job["error"] and INTERRUPTED.search(job["error"]), job["error"]
    assert job["finished_at"] is not None


def test_a_quantization_killed_mid_calibration_fails_with_a_retry_hint_and_its_retry_succeeds(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "data")
    with running(data, "first.log") as server:
        model_id, set_id = upload_classifier_and_samples(server.client)
        request = {"model_id": model_id, "calibration_set_id": set_id}
        job = json_of(server.client.post("/v1/quantizations", json=request), 202)
        url = f"/v1/quantizations/{job['id']}"
        poll(
            lambda: json_of(server.client.get(url), 200),
            lambda state: state["status"] == "running" and state["phase"] == "calibrate",
            timeout_s=120,
            what="the calibrate phase",
        )
        server.kill()

    with running(data, "second.log") as server:
        assert_interrupted(json_of(server.client.get(url), 200))
        assert [m["source"] for m in json_of(server.client.get("/v1/models"), 200)] == ["upload"]
        assert_storage_consistent(server)

        retry = json_of(server.client.post("/v1/quantizations", json=request), 202)
        assert retry["id"] != job["id"]
        done = poll(
            lambda: json_of(server.client.get(f"/v1/quantizations/{retry['id']}"), 200),
            lambda state: state["status"] in FINAL,
            timeout_s=240,
            what="the retried quantization to finish",
        )
        assert done["status"] == "succeeded", done
        cache = server.client.get(f"/v1/quantizations/{retry['id']}/calibration-cache")
        assert cache.status_code == 200 and sha256(cache.content) == cache.headers["X-Content-SHA256"]
        qdq = json_of(server.client.get(f"/v1/models/{done['qdq_model_id']}"), 200)
        assert (qdq["source"], qdq["parent_id"], qdq["quantization"]["explicit"]) == (
            "quantization",
            model_id,
            True,
        )
        assert_storage_consistent(server)


def test_a_build_killed_mid_build_stores_no_engine_and_its_retry_builds_a_verified_one(
    tmp_path: Path,
) -> None:
    data = DataDir(tmp_path / "data")
    resnet50 = (ONNX_ZOO_DIR / "light_resnet50.onnx").read_bytes()
    with running(data, "first.log") as server:
        model = json_of(server.client.post("/v1/models", files={"file": ("resnet50.onnx", resnet50)}), 201)
        request = {"model_id": model["id"], "precision": "fp32", "backend": "tensorrt-rtx"}
        accepted = json_of(server.client.post("/v1/builds", json=request), 202)
        url = f"/v1/builds/{accepted['id']}"
        poll(
            lambda: json_of(server.client.get(url), 200),
            lambda state: state["status"] == "running" and state["phase"] == "build",
            timeout_s=120,
            what="the build phase",
        )
        server.kill()

    with running(data, "second.log") as server:
        assert_interrupted(json_of(server.client.get(url), 200))
        assert json_of(server.client.get("/v1/engines"), 200) == []
        assert server.client.get(f"/v1/engines/{accepted['engine_id']}").status_code == 404
        assert_storage_consistent(server)

        retry = json_of(server.client.post("/v1/builds", json=request), 202)
        assert (retry["cache"], retry["engine_id"], retry["joined_existing"]) == (
            "miss",
            accepted["engine_id"],
            False,
        )
        done = poll(
            lambda: json_of(server.client.get(f"/v1/builds/{retry['id']}"), 200),
            lambda state: state["status"] in FINAL,
            timeout_s=240,
            what="the retried build to finish",
        )
        assert done["status"] == "succeeded", done
        assert done["engine_id"] == accepted["engine_id"]
        assert [engine["id"] for engine in json_of(server.client.get("/v1/engines"), 200)] == [
            done["engine_id"]
        ]
        assert_storage_consistent(server)
        # The same request is now a cache hit on the verified engine.
        assert json_of(server.client.post("/v1/builds", json=request), 200)["cache"] == "hit"


def start_raw_upload(port: int, path: str, body: bytes, *, send: int) -> socket.socket:
    """Send an upload's headers (declaring the whole body) and only its first ``send`` bytes."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    connection.sendall(head.encode() + body[:send])
    return connection


def wait_for_staged_bytes(directory: Path, *, timeout_s: float) -> None:
    """Until a staged upload (``.tmp-*``) with data in it exists in ``directory``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(path.stat().st_size > 0 for path in directory.glob(".tmp-*") if path.is_file()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no staged upload appeared in {directory} within {timeout_s} s")


def test_uploads_cut_off_by_a_kill_leave_nothing_partial_after_restart(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    small = model_bytes(resnet_block_classifier())
    large = model_bytes(resnet_block_classifier(channels=256, seed=3))  # ~5 MB: streamed in many chunks
    samples = npz_bytes(input=classifier_samples(256, size=32))
    with running(data, "first.log") as server:
        complete = json_of(server.client.post("/v1/models", files={"file": ("small.onnx", small)}), 201)
        model_upload = start_raw_upload(
            server.port, "/v1/models?name=large.onnx", large, send=len(large) // 2
        )
        set_upload = start_raw_upload(
            server.port, "/v1/calibration-sets?name=samples.npz", samples, send=len(samples) // 2
        )
        try:
            wait_for_staged_bytes(data.models, timeout_s=60)
            wait_for_staged_bytes(data.calibration / ".incoming", timeout_s=60)
            server.kill()
        finally:
            model_upload.close()
            set_upload.close()

    with running(data, "second.log") as server:
        assert [m["id"] for m in json_of(server.client.get("/v1/models"), 200)] == [complete["id"]]
        assert json_of(server.client.get("/v1/calibration-sets"), 200) == []
        assert_storage_consistent(server)
        # The same uploads sent whole are accepted, under the digest of their bytes.
        retried = json_of(server.client.post("/v1/models", files={"file": ("large.onnx", large)}), 201)
        assert retried["id"] == sha256(large)
        stored_set = json_of(
            server.client.post("/v1/calibration-sets", files={"file": ("samples.npz", samples)}), 201
        )
        assert stored_set["samples"] == 256
        assert_storage_consistent(server)
