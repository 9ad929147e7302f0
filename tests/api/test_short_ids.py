"""Short ids over real HTTP: a unique prefix of at least 8 characters works wherever an id is taken."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.api.serving_helpers import build_engine, upload_model, wait_for, wait_for_report
from tests.data_factory import npz_bytes
from tests.model_factory import resnet_block_classifier
from tests.server import running_server, settings_for


@pytest.fixture(scope="module")
def resources(api: httpx.Client) -> dict[str, Any]:
    model_id = upload_model(api, resnet_block_classifier(seed=47), "short-ids.onnx")
    samples = np.random.default_rng(47).standard_normal((8, 3, 16, 16)).astype(np.float32)
    set_id = api.post(
        "/v1/calibration-sets",
        files={"file": ("s.npz", npz_bytes(input=samples))},
        data={"model_id": model_id},
    ).json()["id"]
    build = api.post("/v1/builds", json={"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"})
    assert build.status_code in (200, 202), build.text
    engine_id = build_engine(api, model_id)
    report_id = api.post(f"/v1/engines/{engine_id[:8]}/benchmark", json={"iterations": 3}).json()["id"]
    wait_for_report(api, report_id)
    return {
        "model": model_id,
        "set": set_id,
        "engine": engine_id,
        "build": build.json().get("id"),
        "report": report_id,
    }


@pytest.mark.parametrize("length", [8, 16])
@pytest.mark.parametrize(
    ("kind", "template"),
    [
        ("model", "/v1/models/{}"),
        ("model", "/v1/models/{}/fusions"),
        ("set", "/v1/calibration-sets/{}"),
        ("engine", "/v1/engines/{}"),
        ("engine", "/v1/engines/{}/fusions"),
        ("engine", "/v1/engines/{}/layers"),
        ("report", "/v1/reports/{}"),
    ],
)
def test_a_prefix_reads_the_same_document_as_the_full_id(
    api: httpx.Client, resources: dict[str, Any], kind: str, template: str, length: int
) -> None:
    full_id = resources[kind]
    by_prefix = api.get(template.format(full_id[:length]))
    assert by_prefix.status_code == 200, by_prefix.text
    assert by_prefix.json() == api.get(template.format(full_id)).json()


def test_a_build_job_is_read_by_its_prefix(api: httpx.Client, resources: dict[str, Any]) -> None:
    if resources["build"] is None:  # the engine was already cached: read a build job from the list
        resources["build"] = api.get("/v1/builds").json()[0]["id"]
    build = wait_for(api, f"/v1/builds/{resources['build'][:8]}")
    assert build["id"] == resources["build"]


def test_answers_name_the_full_id_when_asked_by_prefix(api: httpx.Client, resources: dict[str, Any]) -> None:
    engine, model = resources["engine"], resources["model"]
    assert api.get(f"/v1/engines/{engine[:8]}/fusions").json()["engine_id"] == engine
    assert api.get(f"/v1/models/{model[:8]}/fusions").json()["model_id"] == model
    plan = api.get(f"/v1/engines/{engine[:8]}/plan")
    assert plan.status_code == 200 and engine[:16] in plan.headers["content-disposition"]
    validated = api.get(
        f"/v1/calibration-sets/{resources['set'][:8]}/validate", params={"model_id": model[:8]}
    )
    assert (
        validated.json()["calibration_set_id"] == resources["set"] and validated.json()["model_id"] == model
    )


def test_inference_and_reports_take_a_prefix_and_store_the_full_id(
    api: httpx.Client, resources: dict[str, Any]
) -> None:
    engine = resources["engine"]
    sample = np.zeros((1, 3, 16, 16), dtype=np.float32).tolist()
    answer = api.post(f"/v1/engines/{engine[:10]}/infer", json={"inputs": {"input": sample}})
    assert answer.status_code == 200, answer.text
    report = api.get(f"/v1/reports/{resources['report'][:8]}").json()
    assert report["engine"]["engine_id"] == engine
    evaluation = api.post(f"/v1/engines/{engine[:8]}/evaluate", json={"eval_set_id": resources["set"][:8]})
    assert evaluation.status_code == 202, evaluation.text
    job = wait_for(api, f"/v1/reports/{evaluation.json()['id'][:8]}")
    assert job["status"] == "succeeded", job


@pytest.mark.parametrize("template", ["/v1/models/{}", "/v1/engines/{}", "/v1/reports/{}", "/v1/builds/{}"])
def test_too_short_or_unknown_prefixes_are_404(api: httpx.Client, template: str) -> None:
    for token in ("abc", "0000000", "00000000"):
        response = api.get(template.format(token))
        assert response.status_code == 404, (template, token, response.text)
        assert response.json()["error"]["code"] == "not_found"


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    """A server of its own, whose database the test fills with ids that share a prefix."""
    root = tmp_path_factory.mktemp("short-ids")
    with running_server(settings_for(root)) as client:
        yield client, root / "engine_service.db"


def test_an_ambiguous_prefix_is_409_listing_the_matches(crowded: tuple[httpx.Client, Path]) -> None:
    client, database = crowded
    first, second = "feedface" + "0" * 24, "feedface" + "1" * 24
    with sqlite3.connect(database) as conn:
        for job_id in (first, second):
            conn.execute(
                "INSERT INTO jobs (id, kind, status, params_json, created_at) "
                "VALUES (?, 'benchmark', 'failed', '{}', '2026-01-01T00:00:00Z')",
                (job_id,),
            )
    response = client.get("/v1/reports/feedface")
    assert response.status_code == 409
    body = response.json()["error"]
    assert body["code"] == "conflict" and "several job ids" in body["message"]
    assert body["details"]["matches"] == [first, second]
    assert client.get(f"/v1/reports/{first[:9]}").json()["id"] == first  # one more character decides
