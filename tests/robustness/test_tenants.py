"""Finding 11 of issue 11, reproduced against a server process: tenants, /readyz, file modes, queue.

The probe that found it: with auth on, any key read, downloaded, cancelled or deleted any other key's
resources; ``/readyz`` told anyone the versions, CPU and driver state; the database file was 0644; with
auth off, 100 benchmarks could be queued ahead of a build. Each is checked here as it was probed.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from service.auth.keys import KeyStore
from service.store.db import Database
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.restart.server_process import DataDir, poll, running
from tests.robustness.conftest import StartServer

pytestmark = pytest.mark.timeout(300)

BOOTSTRAP = "bootstrap-" + "r" * 30
FLOOD = 100


def test_one_key_cannot_touch_anothers_model_and_anonymous_readiness_says_only_ready(tmp_path: Path) -> None:
    settings = {"ENGINE_SERVICE_AUTH_ENABLED": "true", "ENGINE_SERVICE_BOOTSTRAP_API_KEY": BOOTSTRAP}
    with running(DataDir(tmp_path / "data"), "server.log", settings) as server:
        db = Database(server.data.database)
        try:
            store = KeyStore(db)
            alice, mallory = (store.create(name).token for name in ("alice", "mallory"))
        finally:
            db.close()
        as_alice, as_mallory = {"X-API-Key": alice}, {"X-API-Key": mallory}
        data = model_bytes(resnet_block_classifier(seed=77))
        model_id = server.client.post(
            "/v1/models", files={"file": ("a.onnx", data)}, headers=as_alice
        ).json()["id"]

        attempts = {
            "list": server.client.get("/v1/models", headers=as_mallory),
            "read": server.client.get(f"/v1/models/{model_id}", headers=as_mallory),
            "download": server.client.get(f"/v1/models/{model_id}/onnx", headers=as_mallory),
            "delete": server.client.delete(f"/v1/models/{model_id}", headers=as_mallory),
        }
        assert attempts["list"].json() == []
        assert {name: r.status_code for name, r in attempts.items() if name != "list"} == {
            "read": 404,
            "download": 404,
            "delete": 404,
        }
        assert server.client.get(f"/v1/models/{model_id}/onnx", headers=as_alice).content == data

        anonymous = server.client.get("/readyz")
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
        assert "backends" in server.client.get("/readyz", headers=as_alice).json()

        files = [server.data.database, *server.data.models.rglob("*")]
        modes = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
        assert modes and all(mode in ("0o600", "0o700") for mode in modes.values()), modes


def test_with_auth_off_a_flood_of_benchmarks_stops_at_the_bound_and_a_build_gets_in(
    server_process: StartServer,
) -> None:
    with server_process(MAX_QUEUED_JOBS_PER_OWNER="4", JOB_WORKERS="1") as server:
        api = server.client
        model_id = api.post(
            "/v1/models", files={"file": ("c.onnx", model_bytes(resnet_block_classifier(seed=78)))}
        ).json()["id"]
        build = {"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
        first = api.post("/v1/builds", json=build)
        assert first.status_code == 202, first.text
        built = poll(
            lambda: api.get(f"/v1/builds/{first.json()['id']}").json(),
            lambda job: job["status"] == "succeeded",
            timeout_s=120,
            what="the first build",
        )
        engine_id = built["engine_id"]

        answers = [
            api.post(f"/v1/engines/{engine_id}/benchmark", json={"duration_s": 60, "warmup": 0})
            for _ in range(FLOOD)
        ]
        accepted = [r.json()["id"] for r in answers if r.status_code == 202]
        refused = [r for r in answers if r.status_code != 202]
        assert len(accepted) == 4 and len(refused) == FLOOD - 4
        assert {r.status_code for r in refused} == {429}
        assert all(r.headers.get("retry-after") for r in refused)
        assert "ENGINE_SERVICE_MAX_QUEUED_JOBS_PER_OWNER" in refused[0].json()["error"]["message"]

        other_model = api.post(
            "/v1/models", files={"file": ("d.onnx", model_bytes(resnet_block_classifier(seed=79)))}
        ).json()["id"]
        second = {**build, "model_id": other_model}
        assert api.post("/v1/builds", json=second).status_code == 429  # nothing jumps the bound either
        for report_id in accepted:
            assert api.delete(f"/v1/reports/{report_id}").status_code == 200
        for report_id in accepted:
            poll(
                lambda rid=report_id: api.get(f"/v1/reports/{rid}").json(),  # type: ignore[misc]
                lambda report: report["status"] in ("cancelled", "failed"),
                timeout_s=60,
                what=f"benchmark {report_id} to stop",
            )
        assert api.post("/v1/builds", json=second).status_code == 202
