"""Tenancy over real HTTP: two API keys and an admin key on one auth-on server.

Every model, calibration set, engine, job and report belongs to the key that made it. Another key gets
the same 404 as for an id that does not exist (for a full id and for a prefix alike), identical content
is stored once and each key holds its own link to it, and an admin key sees everything.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.auth.keys import KeyStore
from service.store.db import Database
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder
from tests.server import running_server, settings_for

BOOTSTRAP = "bootstrap-" + "t" * 30


@dataclass(frozen=True)
class Tenant:
    """One API key's view of the server."""

    client: httpx.Client
    key_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.token}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, headers=self.headers, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, headers=self.headers, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.patch(path, headers=self.headers, **kwargs)

    def delete(self, path: str) -> httpx.Response:
        return self.client.delete(path, headers=self.headers)

    def upload_model(self, data: bytes, name: str = "m.onnx") -> httpx.Response:
        return self.post("/v1/models", files={"file": (name, data)})

    def upload_set(self, data: bytes, **fields: str) -> httpx.Response:
        return self.post("/v1/calibration-sets", files={"file": ("calib.npz", data)}, data=fields)

    def ids(self, path: str) -> set[str]:
        response = self.get(path)
        assert response.status_code == 200, response.text
        return {item["id"] for item in response.json()}


@dataclass(frozen=True)
class Tenants:
    alice: Tenant
    bob: Tenant
    admin: Tenant
    root: Path


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    root = tmp_path_factory.mktemp("tenancy")
    settings = settings_for(root, auth_enabled=True, bootstrap_api_key=BOOTSTRAP)
    with running_server(settings) as client:
        db = Database(settings.database_path)  # keys are made the way the CLI makes them
        try:
            store = KeyStore(db)
            made = {name: store.create(name, admin=name == "admin") for name in ("alice", "bob", "admin")}
        finally:
            db.close()
        by_name = {name: Tenant(client, issued.key.id, issued.token) for name, issued in made.items()}
        yield Tenants(by_name["alice"], by_name["bob"], by_name["admin"], root)


def _wait(tenant: Tenant, path: str, timeout: float = 180) -> dict[str, Any]:
    """Poll a job resource as ``tenant`` until it leaves queued/running."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = tenant.get(path).json()
        if body.get("status") not in ("queued", "running") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def _assert_hidden(tenant: Tenant, method: str, path: str, **kwargs: Any) -> None:
    """Another key's resource answers exactly like a missing one: 404 and a message naming only the id."""
    response = tenant.client.request(method, path, headers=tenant.headers, **kwargs)
    assert response.status_code == 404, (method, path, response.status_code, response.text)
    assert response.json()["error"]["code"] == "not_found"


def _model_blob(tenants: Tenants, model_id: str) -> Path:
    """Where the model store keeps a model's bytes (content-addressed, sharded by its first two digits)."""
    return tenants.root / "models" / model_id[:2] / f"{model_id}.onnx"


def _classifier(seed: int) -> bytes:
    return model_bytes(resnet_block_classifier(seed=seed))


def test_a_key_sees_reads_and_deletes_only_its_own_models(tenants: Tenants) -> None:
    alice, bob, admin = tenants.alice, tenants.bob, tenants.admin
    created = alice.upload_model(_classifier(101), "alice.onnx")
    assert created.status_code == 201, created.text
    model_id = created.json()["id"]

    assert model_id in alice.ids("/v1/models")
    assert model_id not in bob.ids("/v1/models")
    for method, path in [
        ("GET", f"/v1/models/{model_id}"),
        ("GET", f"/v1/models/{model_id[:12]}"),  # a prefix finds only the caller's own ids
        ("GET", f"/v1/models/{model_id}/onnx"),
        ("GET", f"/v1/models/{model_id}/fusions"),
        ("DELETE", f"/v1/models/{model_id}"),
    ]:
        _assert_hidden(bob, method, path)
    _assert_hidden(bob, "PATCH", f"/v1/models/{model_id}", json={"task": {"kind": "classification"}})
    unknown = bob.get("/v1/models/" + "0" * 64).json()["error"]["message"]
    hidden = bob.get(f"/v1/models/{model_id}").json()["error"]["message"]
    assert hidden == unknown.replace("0" * 64, model_id)  # nothing tells the two apart

    assert alice.get(f"/v1/models/{model_id}").status_code == 200  # bob's attempts changed nothing
    assert model_id in admin.ids("/v1/models")
    assert admin.get(f"/v1/models/{model_id}/onnx").status_code == 200


def test_identical_uploads_are_stored_once_and_deleting_one_keys_copy_keeps_the_others(
    tenants: Tenants,
) -> None:
    alice, bob, admin = tenants.alice, tenants.bob, tenants.admin
    data = _classifier(102)
    first = alice.upload_model(data)
    second = bob.upload_model(data)
    assert (first.status_code, second.status_code) == (201, 201)  # new to each key: nothing leaks
    assert bob.upload_model(data).status_code == 200  # bob already has it
    model_id = first.json()["id"]
    assert second.json()["id"] == model_id
    blob = _model_blob(tenants, model_id)
    stored = [p for p in (tenants.root / "models").rglob(f"{model_id}*") if p.is_file()]
    assert stored == [blob]  # one copy for both keys

    assert alice.delete(f"/v1/models/{model_id}").status_code == 204
    _assert_hidden(alice, "GET", f"/v1/models/{model_id}")
    assert bob.get(f"/v1/models/{model_id}/onnx").content == data
    assert blob.exists()

    assert bob.delete(f"/v1/models/{model_id}").status_code == 204
    assert not blob.exists()
    _assert_hidden(admin, "GET", f"/v1/models/{model_id}")  # gone for everyone once the last link went


def test_calibration_sets_belong_to_their_key_and_are_stored_once(tenants: Tenants) -> None:
    alice, bob, admin = tenants.alice, tenants.bob, tenants.admin
    model_id = alice.upload_model(_classifier(103)).json()["id"]
    data = npz_bytes(input=classifier_samples(8, seed=7))
    created = alice.upload_set(data, model_id=model_id)
    assert created.status_code == 201, created.text
    set_id = created.json()["id"]

    assert set_id in alice.ids("/v1/calibration-sets") and set_id not in bob.ids("/v1/calibration-sets")
    for method, path in [
        ("GET", f"/v1/calibration-sets/{set_id}"),
        ("GET", f"/v1/calibration-sets/{set_id[:10]}"),
        ("GET", f"/v1/calibration-sets/{set_id}/validate?model_id={model_id}"),
        ("DELETE", f"/v1/calibration-sets/{set_id}"),
    ]:
        _assert_hidden(bob, method, path)
    # Bob cannot validate his upload against alice's model either.
    _assert_hidden(
        bob, "POST", "/v1/calibration-sets", files={"file": ("c.npz", data)}, data={"model_id": model_id}
    )

    assert bob.upload_set(data).status_code == 201
    stored = tenants.root / "calibration_data" / set_id
    assert stored.is_dir()
    assert bob.delete(f"/v1/calibration-sets/{set_id}").status_code == 204
    assert alice.get(f"/v1/calibration-sets/{set_id}").status_code == 200 and stored.is_dir()
    assert set_id in admin.ids("/v1/calibration-sets")
    assert alice.delete(f"/v1/calibration-sets/{set_id}").status_code == 204
    assert not stored.exists()


@pytest.fixture(scope="module")
def alice_engine(tenants: Tenants) -> dict[str, str]:
    """Alice's FP32 ONNX Runtime engine of her classifier, with the build job that made it."""
    alice = tenants.alice
    data = _classifier(104)
    model_id = alice.upload_model(data).json()["id"]
    set_id = alice.upload_set(npz_bytes(input=classifier_samples(8, seed=3)), model_id=model_id).json()["id"]
    accepted = alice.post(
        "/v1/builds", json={"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
    )
    assert accepted.status_code == 202, accepted.text
    job = _wait(alice, f"/v1/builds/{accepted.json()['id']}")
    assert job["status"] == "succeeded", job
    return {"model_id": model_id, "set_id": set_id, "engine_id": job["engine_id"], "build_id": job["id"]}


def test_build_jobs_and_engines_are_the_builders_own(tenants: Tenants, alice_engine: dict[str, str]) -> None:
    alice, bob, admin = tenants.alice, tenants.bob, tenants.admin
    engine_id, build_id = alice_engine["engine_id"], alice_engine["build_id"]
    assert engine_id in alice.ids("/v1/engines") and build_id in alice.ids("/v1/builds")
    assert engine_id not in bob.ids("/v1/engines") and build_id not in bob.ids("/v1/builds")
    for method, path in [
        ("GET", f"/v1/builds/{build_id}"),
        ("DELETE", f"/v1/builds/{build_id}"),
        ("GET", f"/v1/engines/{engine_id}"),
        ("GET", f"/v1/engines/{engine_id[:12]}"),
        ("GET", f"/v1/engines/{engine_id}/layers"),
        ("GET", f"/v1/engines/{engine_id}/fusions"),
        ("GET", f"/v1/engines/{engine_id}/plan"),
        ("GET", f"/v1/engines/{engine_id}/model.onnx"),
        ("GET", f"/v1/engines/{engine_id}/calibration-cache"),
        ("GET", f"/v1/engines/{engine_id}/triton"),
        ("GET", f"/v1/engines?model_id={alice_engine['model_id']}"),
        ("DELETE", f"/v1/engines/{engine_id}"),
    ]:
        _assert_hidden(bob, method, path)
    inputs = {"inputs": {"input": classifier_samples(1).tolist()}}
    _assert_hidden(bob, "POST", f"/v1/engines/{engine_id}/infer", json=inputs)
    assert alice.post(f"/v1/engines/{engine_id}/infer", json=inputs).status_code == 200
    _assert_hidden(bob, "POST", f"/v1/engines/{engine_id}/benchmark", json={"iterations": 1})
    _assert_hidden(
        bob, "POST", f"/v1/engines/{engine_id}/evaluate", json={"eval_set_id": alice_engine["set_id"]}
    )
    # Nor can bob build from alice's model or compare her engines.
    _assert_hidden(
        bob, "POST", "/v1/builds", json={"model_id": alice_engine["model_id"], "precision": "fp32"}
    )
    _assert_hidden(bob, "POST", "/v1/reports/comparison", json={"engine_ids": [engine_id, engine_id]})

    assert engine_id in admin.ids("/v1/engines") and build_id in admin.ids("/v1/builds")
    assert admin.get(f"/v1/engines/{engine_id}/plan").status_code == 200


def test_a_cache_hit_shares_the_engine_and_each_key_deletes_only_its_own_link(
    tenants: Tenants, alice_engine: dict[str, str]
) -> None:
    alice, bob = tenants.alice, tenants.bob
    bob_model = bob.upload_model(_classifier(104))  # the same bytes alice built from
    assert bob_model.status_code == 201 and bob_model.json()["id"] == alice_engine["model_id"]
    hit = bob.post(
        "/v1/builds",
        json={"model_id": alice_engine["model_id"], "precision": "fp32", "backend": "onnxruntime"},
    )
    assert hit.status_code == 200 and (hit.json()["cache"], hit.json()["engine_id"]) == (
        "hit",
        alice_engine["engine_id"],
    )
    engine_id = alice_engine["engine_id"]
    assert engine_id in bob.ids("/v1/engines")
    assert alice_engine["build_id"] not in bob.ids("/v1/builds")  # the engine is shared, alice's job is not
    plans = {p for p in (tenants.root / "engines" / "plans").rglob("*") if p.is_file()}
    assert plans

    assert bob.delete(f"/v1/engines/{engine_id}").status_code == 204
    _assert_hidden(bob, "GET", f"/v1/engines/{engine_id}")
    assert alice.get(f"/v1/engines/{engine_id}/plan").status_code == 200
    assert all(p.exists() for p in plans)


def test_reports_belong_to_the_key_that_asked_for_them(
    tenants: Tenants, alice_engine: dict[str, str]
) -> None:
    alice, bob, admin = tenants.alice, tenants.bob, tenants.admin
    accepted = alice.post(
        f"/v1/engines/{alice_engine['engine_id']}/benchmark", json={"iterations": 2, "warmup": 0}
    )
    assert accepted.status_code == 202, accepted.text
    report_id = accepted.json()["id"]
    for method, path in [
        ("GET", f"/v1/reports/{report_id}"),
        ("GET", f"/v1/reports/{report_id[:12]}"),
        ("GET", f"/v1/reports/{report_id}.html"),
        ("GET", f"/v1/reports/{report_id}.png"),
        ("DELETE", f"/v1/reports/{report_id}"),
    ]:
        _assert_hidden(bob, method, path)
    assert report_id not in bob.ids("/v1/reports") and report_id in admin.ids("/v1/reports")
    report = _wait(alice, f"/v1/reports/{report_id}")
    assert report["status"] == "succeeded", report
    assert report_id in alice.ids("/v1/reports")


def test_quantization_jobs_and_their_qdq_model_belong_to_the_key(
    tenants: Tenants, alice_engine: dict[str, str]
) -> None:
    alice, bob = tenants.alice, tenants.bob
    body = {
        "model_id": alice_engine["model_id"],
        "calibration_set_id": alice_engine["set_id"],
        "method": "max",
        "holdout_fraction": 0.0,
        "target": "onnxruntime",
    }
    _assert_hidden(bob, "POST", "/v1/quantizations", json=body)
    accepted = alice.post("/v1/quantizations", json=body)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    for method, path in [
        ("GET", f"/v1/quantizations/{job_id}"),
        ("GET", f"/v1/quantizations/{job_id}/calibration-cache"),
        ("DELETE", f"/v1/quantizations/{job_id}"),
    ]:
        _assert_hidden(bob, method, path)
    assert job_id not in bob.ids("/v1/quantizations")
    job = _wait(alice, f"/v1/quantizations/{job_id}")
    assert job["status"] == "succeeded", job
    qdq_model_id = job["qdq_model_id"]
    assert qdq_model_id in alice.ids("/v1/models")  # what a job makes is its owner's
    _assert_hidden(bob, "GET", f"/v1/models/{qdq_model_id}")


def test_readyz_says_only_ready_without_a_key_and_the_details_with_one(tenants: Tenants) -> None:
    client = tenants.alice.client
    anonymous = client.get("/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    wrong_key = client.get("/readyz", headers={"X-API-Key": "esk_" + "x" * 43})
    assert wrong_key.status_code == 200 and wrong_key.json() == {"status": "ready"}
    detailed = client.get("/readyz", headers=tenants.bob.headers).json()
    assert detailed["status"] == "ready" and detailed["storage_writable"] is True
    assert {b["name"] for b in detailed["backends"]} == {"tensorrt", "tensorrt-rtx", "onnxruntime"}


def test_a_small_model_of_one_key_never_appears_in_anothers_lists(tenants: Tenants) -> None:
    created = tenants.bob.upload_model(model_bytes(two_input_adder(size=5)))
    assert created.status_code == 201
    assert created.json()["id"] not in tenants.alice.ids("/v1/models")
    assert created.json()["id"] in tenants.admin.ids("/v1/models")


def test_a_precision_auto_build_gives_each_asking_key_the_engines_it_judged(
    tenants: Tenants, alice_engine: dict[str, str]
) -> None:
    alice, bob = tenants.alice, tenants.bob
    body = {
        "model_id": alice_engine["model_id"],
        "calibration_set_id": alice_engine["set_id"],
        "precision": "auto",
        "backend": "onnxruntime",
    }
    accepted = alice.post("/v1/builds", json=body)
    assert accepted.status_code == 202 and accepted.json()["engine_id"] is None, accepted.text
    job = _wait(alice, f"/v1/builds/{accepted.json()['id']}")
    assert job["status"] == "succeeded", job
    judged = {job["engine_id"], job["result"]["precision_choice"]["int8"]["engine_id"]}
    assert judged <= alice.ids("/v1/engines")
    assert not judged & bob.ids("/v1/engines")

    # Bob with the same bytes: the cached decision answers, and both engines become his too.
    assert (
        bob.upload_set(npz_bytes(input=classifier_samples(8, seed=3))).json()["id"]
        == body["calibration_set_id"]
    )
    hit = bob.post("/v1/builds", json=body)
    assert hit.status_code == 200 and hit.json()["engine_id"] == job["engine_id"], hit.text
    assert judged <= bob.ids("/v1/engines")


def _fp32_engine(tenant: Tenant, model_id: str) -> httpx.Response:
    return tenant.post(
        "/v1/builds", json={"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
    )


def test_a_model_only_another_keys_engine_uses_leaves_the_view_and_goes_with_that_engine(
    tenants: Tenants,
) -> None:
    alice, bob, admin = tenants.alice, tenants.bob, tenants.admin
    data = _classifier(106)
    model_id = alice.upload_model(data).json()["id"]
    built = _fp32_engine(alice, model_id)
    engine_id = _wait(alice, f"/v1/builds/{built.json()['id']}")["engine_id"]
    assert bob.upload_model(data).json()["id"] == model_id
    assert _fp32_engine(bob, model_id).status_code == 200  # a cache hit: bob holds the engine too
    blob = _model_blob(tenants, model_id)

    assert bob.delete(f"/v1/models/{model_id}").status_code == 204  # alice still holds it
    assert alice.delete(f"/v1/engines/{engine_id}").status_code == 204  # bob still holds it
    # Alice's model is now used only by bob's engine: it leaves her view and stays stored for it.
    assert alice.delete(f"/v1/models/{model_id}").status_code == 204
    _assert_hidden(alice, "GET", f"/v1/models/{model_id}")
    assert blob.exists()
    assert bob.get(f"/v1/engines/{engine_id}/model.onnx").status_code == 200

    assert bob.delete(f"/v1/engines/{engine_id}").status_code == 204  # the last holder of the engine
    _assert_hidden(admin, "GET", f"/v1/engines/{engine_id}")
    _assert_hidden(admin, "GET", f"/v1/models/{model_id}")  # nothing holds or uses it: gone
    assert not blob.exists()


def test_deleting_a_model_your_own_engine_uses_is_409_naming_only_yours(tenants: Tenants) -> None:
    alice = tenants.alice
    model_id = alice.upload_model(_classifier(107)).json()["id"]
    built = _fp32_engine(alice, model_id)
    engine_id = _wait(alice, f"/v1/builds/{built.json()['id']}")["engine_id"]
    refused = alice.delete(f"/v1/models/{model_id}")
    assert refused.status_code == 409, refused.text
    message = refused.json()["error"]["message"]
    assert f"your engines {engine_id}" in message and "DELETE /v1/engines/{id}" in message
    assert alice.get(f"/v1/models/{model_id}").status_code == 200  # refused: nothing changed


def test_each_key_sees_its_own_name_for_shared_content_and_never_anothers(tenants: Tenants) -> None:
    alice, bob = tenants.alice, tenants.bob
    data = _classifier(108)
    model_id = alice.upload_model(data, "alice-secret-project.onnx").json()["id"]
    uploaded = bob.upload_model(data, "bob.onnx")
    assert uploaded.json()["name"] == "bob.onnx"
    assert bob.get(f"/v1/models/{model_id}").json()["name"] == "bob.onnx"
    assert {m["id"]: m["name"] for m in bob.get("/v1/models").json()}[model_id] == "bob.onnx"
    download = bob.get(f"/v1/models/{model_id}/onnx")
    assert 'filename="bob.onnx"' in download.headers["content-disposition"]
    assert alice.get(f"/v1/models/{model_id}").json()["name"] == "alice-secret-project.onnx"

    built = _fp32_engine(alice, model_id)
    engine_id = _wait(alice, f"/v1/builds/{built.json()['id']}")["engine_id"]
    assert _fp32_engine(bob, model_id).status_code == 200
    triton = bob.get(f"/v1/engines/{engine_id}/triton")
    assert triton.status_code == 200, triton.text
    assert triton.headers["x-triton-model-name"].startswith("bob")
    assert "secret" not in triton.headers["content-disposition"]

    samples = npz_bytes(input=classifier_samples(4, seed=11))
    set_id = alice.post("/v1/calibration-sets", files={"file": ("alice-calib.npz", samples)}).json()["id"]
    assert bob.post("/v1/calibration-sets", files={"file": ("b.npz", samples)}).json()["name"] == "b.npz"
    assert bob.get(f"/v1/calibration-sets/{set_id}").json()["name"] == "b.npz"
    assert {s["id"]: s["name"] for s in bob.get("/v1/calibration-sets").json()}[set_id] == "b.npz"
