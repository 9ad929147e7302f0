"""The worker routes of the API server, called over real HTTP as a remote worker (or an intruder) would.

Each test queues a real build job (nobody runs it: no worker listens) and drives its row through the
worker API; the server must refuse every out-of-order step and every damaged or mislabelled upload,
and store nothing when it refuses.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.services import open_services
from tests.remote.conftest import WORKER_TOKEN, RemoteSetup, short_lease_server
from tests.server import running_server, settings_for

pytest.importorskip("rq", reason="the 'redis' extra (rq, redis) is not installed")


@pytest.fixture
def worker(remote_setup: RemoteSetup) -> Iterator[httpx.Client]:
    with remote_setup.worker_client() as client:
        yield client


@pytest.fixture
def queued_build(remote_setup: RemoteSetup) -> Iterator[str]:
    """A queued fp32 onnxruntime build of the classifier (a fresh engine key per test: fp32 is cheap)."""
    existing = remote_setup.api.get("/v1/engines").json()
    for engine in existing:  # a previous test may have stored this very engine
        remote_setup.api.delete(f"/v1/engines/{engine['id']}")
    response = remote_setup.api.post(
        "/v1/builds", json={"model_id": remote_setup.model_id, "precision": "fp32", "backend": "onnxruntime"}
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    yield job_id
    if remote_setup.api.get(f"/v1/builds/{job_id}").json()["status"] in ("queued", "running"):
        remote_setup.api.delete(f"/v1/builds/{job_id}")
        with remote_setup.worker_client() as client:
            client.post(f"/v1/worker/jobs/{job_id}/finish", json={"status": "failed", "error": "test over"})


def _claim(worker: httpx.Client, job_id: str, claimant: str = "test-host/claim-0001") -> dict[str, Any]:
    response = worker.post(f"/v1/worker/jobs/{job_id}/claim", json={"claimant": claimant})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_worker_api_needs_the_worker_token_and_nothing_else_opens_it(remote_setup: RemoteSetup) -> None:
    with remote_setup.worker_client() as good:
        hello = good.get("/v1/worker/hello")
    assert hello.status_code == 200 and hello.json()["preparation_version"] >= 1
    with remote_setup.worker_client("not-the-token-" + "9" * 30) as wrong:
        assert wrong.get("/v1/worker/hello").status_code == 401
    anonymous = remote_setup.api.get("/v1/worker/hello")
    assert anonymous.status_code == 401 and "X-Worker-Token" in anonymous.json()["error"]["message"]
    # An internal protocol: not in the public schema.
    paths = remote_setup.api.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/v1/worker")]


def test_a_server_without_a_worker_token_takes_no_remote_workers(tmp_path: Path) -> None:
    with running_server(settings_for(tmp_path)) as api:
        response = api.get("/v1/worker/hello", headers={"X-Worker-Token": WORKER_TOKEN})
    assert response.status_code == 404
    assert "ENGINE_SERVICE_WORKER_TOKEN" in response.json()["error"]["message"]


def test_with_auth_on_api_keys_do_not_open_worker_routes_and_the_token_opens_no_user_route(
    tmp_path: Path,
) -> None:
    key = "bootstrap-key-" + "a1" * 16
    settings = settings_for(tmp_path, auth_enabled=True, bootstrap_api_key=key, worker_token=WORKER_TOKEN)
    with running_server(settings) as api:
        assert api.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
        assert api.get("/v1/worker/hello", headers={"X-API-Key": key}).status_code == 401
        assert api.get("/v1/models", headers={"X-Worker-Token": WORKER_TOKEN}).status_code == 401
        assert api.get("/v1/worker/hello", headers={"X-Worker-Token": WORKER_TOKEN}).status_code == 200


def test_a_worker_token_too_short_to_be_safe_stops_the_server_from_starting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 20 characters") as caught:
        open_services(settings_for(tmp_path, worker_token="short-secret"))
    assert "short-secret" not in str(caught.value)


def test_a_job_is_claimed_once_and_reported_only_while_it_runs(
    remote_setup: RemoteSetup, worker: httpx.Client, queued_build: str
) -> None:
    job = queued_build
    assert (
        worker.post("/v1/worker/jobs/nope/claim", json={"claimant": "test-host/1234567"}).status_code == 404
    )
    early = worker.post(f"/v1/worker/jobs/{job}/progress", json={"progress": 0.1})
    assert early.status_code == 409  # not running yet
    assert worker.post(f"/v1/worker/jobs/{job}/log", json={"text": "hello\n"}).status_code == 409

    claimed = _claim(worker, job)
    assert claimed["status"] == "running" and claimed["params"]["engine_id"]
    again = _claim(worker, job)  # the same attempt retrying after a lost answer
    assert again["status"] == "running"
    other = worker.post(f"/v1/worker/jobs/{job}/claim", json={"claimant": "other-host/claim-0002"})
    assert other.status_code == 409

    progress = worker.post(f"/v1/worker/jobs/{job}/progress", json={"progress": 0.4, "phase": "calibrate"})
    assert progress.status_code == 200 and progress.json() == {"cancel_requested": False}
    assert worker.post(f"/v1/worker/jobs/{job}/progress", json={"progress": 1.5}).status_code == 422
    assert (
        worker.post(f"/v1/worker/jobs/{job}/log", json={"text": "12:00:00 remote line\n"}).status_code == 200
    )
    seen = remote_setup.api.get(f"/v1/builds/{job}").json()
    assert seen["phase"] == "calibrate" and seen["progress"] == pytest.approx(0.4)
    assert "12:00:00 remote line" in seen["log_tail"]

    assert remote_setup.api.delete(f"/v1/builds/{job}").status_code == 200  # a user cancels it
    flagged = worker.post(f"/v1/worker/jobs/{job}/progress", json={"progress": 0.5})
    assert flagged.json() == {"cancel_requested": True}
    assert worker.get(f"/v1/worker/jobs/{job}/cancel").json() == {"cancel_requested": True}

    premature = worker.post(f"/v1/worker/jobs/{job}/finish", json={"status": "succeeded", "result": {}})
    assert premature.status_code == 409 and "uploaded" in premature.json()["error"]["message"]
    unexplained = worker.post(f"/v1/worker/jobs/{job}/finish", json={"status": "cancelled"})
    assert unexplained.status_code == 400
    done = worker.post(
        f"/v1/worker/jobs/{job}/finish", json={"status": "cancelled", "error": "cancelled on request"}
    )
    assert done.status_code == 200 and done.json()["status"] == "cancelled"
    assert (
        worker.post(f"/v1/worker/jobs/{job}/finish", json={"status": "failed", "error": "x"}).status_code
        == 409
    )
    assert remote_setup.api.get(f"/v1/builds/{job}").json()["status"] == "cancelled"


def _real_build(remote_setup: RemoteSetup, job_params: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """Build the job's engine here with the real backend, as a worker would, without uploading it."""
    from service.backends.registry import get_backend
    from service.builds.job_params import BuildJobParams
    from service.builds.pipeline import BuildPipeline
    from service.onnx_graph.loading import model_from_bytes

    model = model_from_bytes(remote_setup.api.get(f"/v1/models/{remote_setup.model_id}/onnx").content)
    key = BuildJobParams.from_json(job_params).key
    backend = get_backend(key.backend.name)
    model_bytes = model.SerializeToString()
    built = backend.build(model_bytes, BuildPipeline.build_spec(key.config, _as_prepared(model)))
    report = {
        "backend": {
            "name": built.info.name,
            "version": built.info.version,
            "device": built.info.device,
            "compute_capability": built.info.compute_capability,
        },
        "layer_counts": {"total": len(built.layer_report.layers)},
    }
    return {
        "model": model_bytes,
        "engine": built.engine_bytes,
        "extension": built.file_extension,
        "report": report,
    }


def _as_prepared(model: Any) -> Any:
    from service.builds.pipeline import PreparedModel

    return PreparedModel(model=model, steps=(), keep_layers=())


def _upload(worker: httpx.Client, job: str, build: dict[str, Any], **overrides: Any) -> httpx.Response:
    metadata = {
        "built_model_name": "classifier-fp32-onnxruntime.onnx",
        "built_model_sha256": hashlib.sha256(build["model"]).hexdigest(),
        "engine_sha256": hashlib.sha256(build["engine"]).hexdigest(),
        "file_extension": build["extension"],
        "build_seconds": 0.1,
        "report": build["report"],
    }
    metadata.update(overrides.pop("metadata", {}))
    files = {
        "built_model": ("model.onnx", overrides.pop("model", build["model"])),
        "engine": ("engine", overrides.pop("engine", build["engine"])),
    }
    return worker.post(f"/v1/worker/jobs/{job}/engine", data={"metadata": json.dumps(metadata)}, files=files)


def test_an_uploaded_engine_is_stored_only_when_it_is_whole_and_built_for_the_jobs_target(
    remote_setup: RemoteSetup, worker: httpx.Client, queued_build: str, tmp_path: Path
) -> None:
    job = queued_build
    params = _claim(worker, job)["params"]
    build = _real_build(remote_setup, params, tmp_path)
    models_before = {m["id"] for m in remote_setup.api.get("/v1/models").json()}

    damaged = _upload(worker, job, build, engine=build["engine"][:-10] + b"0123456789")
    assert damaged.status_code == 400 and "damaged" in damaged.json()["error"]["message"]
    wrong_target = _upload(
        worker,
        job,
        build,
        metadata={"report": {"backend": {**build["report"]["backend"], "device": "elsewhere"}}},
    )
    assert wrong_target.status_code == 409 and "queued for" in wrong_target.json()["error"]["message"]
    odd_extension = _upload(worker, job, build, metadata={"file_extension": "/../../x"})
    assert odd_extension.status_code == 400
    not_onnx = b"not an onnx model"
    bad_model = _upload(
        worker,
        job,
        build,
        model=not_onnx,
        metadata={"built_model_sha256": hashlib.sha256(not_onnx).hexdigest()},
    )
    assert bad_model.status_code == 400
    bad_json = worker.post(
        f"/v1/worker/jobs/{job}/engine",
        data={"metadata": "{"},
        files={"built_model": ("m", b"x"), "engine": ("e", b"y")},
    )
    assert bad_json.status_code == 400
    foreign_key = _upload(worker, job, build, metadata={"key_digest": "f" * 64})
    assert foreign_key.status_code == 409 and "builds none of" in foreign_key.json()["error"]["message"]
    # Nothing was stored by any refused upload.
    assert remote_setup.api.get("/v1/engines").json() == []
    assert {m["id"] for m in remote_setup.api.get("/v1/models").json()} == models_before

    stored = _upload(worker, job, build, metadata={"key_digest": params["engine_id"]})
    assert stored.status_code == 200, stored.text
    engine_id = stored.json()["engine_id"]
    assert engine_id == params["engine_id"]  # the server's key, not one the worker chose
    plan = remote_setup.api.get(f"/v1/engines/{engine_id}/plan")
    assert plan.content == build["engine"]
    finished = worker.post(
        f"/v1/worker/jobs/{job}/finish", json={"status": "succeeded", "result": {"engine_id": engine_id}}
    )
    assert finished.status_code == 200
    assert remote_setup.api.get(f"/v1/builds/{job}").json()["engine_id"] == engine_id
    # The API host's metrics count remote builds like its own.
    metrics = remote_setup.api.get("/metrics").text
    assert 'engine_service_jobs_finished_total{kind="build",state="succeeded"}' in metrics
    assert "engine_service_build_duration_seconds_count" in metrics


def test_calibration_files_are_served_by_listed_name_only(
    remote_setup: RemoteSetup, worker: httpx.Client
) -> None:
    set_id = remote_setup.calibration_set_id
    listing = worker.get(f"/v1/worker/calibration-sets/{set_id}").json()
    names = {f["name"] for f in listing["files"]}
    assert "info.json" in names and any(name.endswith(".npy") for name in names)
    info = worker.get(f"/v1/worker/calibration-sets/{set_id}/files/info.json")
    assert info.status_code == 200 and json.loads(info.content)
    for name in ("..%2F..%2Fengine_service.db", ".hidden", "missing.npy", "%2Fetc%2Fpasswd"):
        assert worker.get(f"/v1/worker/calibration-sets/{set_id}/files/{name}").status_code == 404, name
    assert worker.get(f"/v1/worker/calibration-sets/{'0' * 64}").status_code == 404
    model = worker.get(f"/v1/worker/models/{remote_setup.model_id}")
    assert hashlib.sha256(model.content).hexdigest() == remote_setup.model_id


def test_worker_uploads_are_held_to_their_own_limit(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, worker_token=WORKER_TOKEN, max_worker_upload_bytes=1000)
    with running_server(settings) as api:
        response = api.post(
            "/v1/worker/jobs/x/engine",
            headers={"X-Worker-Token": WORKER_TOKEN},
            files={"engine": ("e", b"\0" * (2 * 1024 * 1024))},
            data={"metadata": "{}"},
        )
    assert response.status_code == 413
    assert "ENGINE_SERVICE_MAX_WORKER_UPLOAD_BYTES" in response.json()["error"]["message"]


def test_a_remote_job_stays_running_while_its_worker_beats_and_is_failed_as_lost_when_it_stops(
    tmp_path: Path, redis_url: str
) -> None:
    from service.jobs.leases import LOST_REASON

    with short_lease_server(tmp_path, redis_url) as (api, _, job_id):
        worker = httpx.Client(base_url=str(api.base_url), headers={"X-Worker-Token": WORKER_TOKEN})
        with worker:
            _claim(worker, job_id)
            for _ in range(12):  # 2.4 s of beats, more than twice the lease
                assert worker.post(f"/v1/worker/jobs/{job_id}/heartbeat").status_code == 200
                time.sleep(0.2)
            assert api.get(f"/v1/builds/{job_id}").json()["status"] == "running"

            deadline = time.monotonic() + 10  # silence: lease 1 s, sweeps every 0.1 s
            while api.get(f"/v1/builds/{job_id}").json()["status"] == "running":
                assert time.monotonic() < deadline, "the silent job was never failed"
                time.sleep(0.1)
            final = api.get(f"/v1/builds/{job_id}").json()
            assert final["status"] == "failed" and final["error"] == LOST_REASON
            # The worker, back from a partition, is told its job is over.
            assert worker.post(f"/v1/worker/jobs/{job_id}/heartbeat").status_code == 409
            assert (
                worker.post(f"/v1/worker/jobs/{job_id}/progress", json={"progress": 0.9}).status_code == 409
            )
