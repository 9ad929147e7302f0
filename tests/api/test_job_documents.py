"""Every route that answers with a job declares its kind's document and answers with exactly it.

Real server, real jobs: a fresh model is built (ONNX Runtime FP32), quantized (method max) and
benchmarked, and each route's answer is checked against the model the OpenAPI schema names.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from service.api.jobs_common import BuildPublic, JobPublic, QuantizationPublic
from tests.api.conftest import wait_for_job
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier

ROUTES = [
    ("/v1/builds", "get", "200", "BuildPublic"),
    ("/v1/builds/{build_id}", "get", "200", "BuildPublic"),
    ("/v1/builds/{build_id}", "delete", "200", "BuildPublic"),
    ("/v1/quantizations", "post", "202", "QuantizationPublic"),
    ("/v1/quantizations", "get", "200", "QuantizationPublic"),
    ("/v1/quantizations/{job_id}", "get", "200", "QuantizationPublic"),
    ("/v1/quantizations/{job_id}", "delete", "200", "QuantizationPublic"),
    ("/v1/reports", "get", "200", "JobPublic"),
    ("/v1/reports/{report_id}", "delete", "200", "JobPublic"),
]


@pytest.mark.parametrize(("path", "method", "status", "name"), ROUTES)
def test_every_job_route_declares_its_kinds_document(
    api: httpx.Client, path: str, method: str, status: str, name: str
) -> None:
    response = api.get("/openapi.json").json()["paths"][path][method]["responses"][status]
    schema = response["content"]["application/json"]["schema"]
    assert schema.get("items", schema)["$ref"] == f"#/components/schemas/{name}"


def test_the_job_documents_type_their_kinds_result(api: httpx.Client) -> None:
    schemas = api.get("/openapi.json").json()["components"]["schemas"]
    for name, result in (("BuildPublic", "BuildResult"), ("QuantizationPublic", "QuantizationResult")):
        refs = [option.get("$ref") for option in schemas[name]["properties"]["result"]["anyOf"]]
        assert f"#/components/schemas/{result}" in refs
    assert schemas["BuildResult"]["required"] == ["engine_id"]
    assert set(schemas["QuantizationResult"]["required"]) == {
        "qdq_model_id",
        "calibration_cache_sha256",
        "calibration_samples",
        "holdout_samples",
    }


def _exactly(model: type[BaseModel], document: dict[str, Any]) -> BaseModel:
    """The document read as ``model``; it must carry the model's fields and nothing else."""
    parsed = model.model_validate(document)
    assert parsed.model_dump(mode="json") == document
    assert set(document) == set(model.model_fields)
    return parsed


@pytest.fixture(scope="module")
def fresh_model(api: httpx.Client) -> dict[str, str]:
    """A model no other test builds (so its build is a job, not a cache hit) and a set for it."""
    model = api.post(
        "/v1/models", files={"file": ("docs.onnx", model_bytes(resnet_block_classifier(seed=2107)))}
    )
    assert model.status_code == 201, model.text
    calibration = api.post(
        "/v1/calibration-sets",
        files={"file": ("docs.npz", npz_bytes(input=classifier_samples(16, seed=2107)))},
        data={"model_id": model.json()["id"]},
    )
    assert calibration.status_code == 201, calibration.text
    return {"model_id": model.json()["id"], "calibration_set_id": calibration.json()["id"]}


def test_build_job_answers_are_build_documents(api: httpx.Client, fresh_model: dict[str, str]) -> None:
    created = api.post(
        "/v1/builds",
        json={"model_id": fresh_model["model_id"], "precision": "fp32", "backend": "onnxruntime"},
    )
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    done = wait_for_job(api, f"/v1/builds/{job_id}")
    build = _exactly(BuildPublic, done)
    assert isinstance(build, BuildPublic) and build.status == "succeeded" and build.result is not None
    assert build.engine_state == "available" and build.engine_id == created.json()["engine_id"]
    assert (
        build.params["engine_id"] == build.engine_id and build.params["model_id"] == fresh_model["model_id"]
    )
    assert build.params["calibration_set_id"] is None and build.params["eval_set_id"] is None
    assert build.params["key"]["model_sha256"] == fresh_model["model_id"]
    listed = [doc for doc in api.get("/v1/builds").json() if doc["id"] == job_id]
    assert len(listed) == 1 and _exactly(BuildPublic, listed[0]).engine_state == "available"
    cancelled = api.delete(f"/v1/builds/{job_id}")  # a finished build is left as it is
    assert cancelled.status_code == 200 and _exactly(BuildPublic, cancelled.json()).status == "succeeded"


def test_quantization_job_answers_are_quantization_documents(
    api: httpx.Client, fresh_model: dict[str, str]
) -> None:
    created = api.post("/v1/quantizations", json={**fresh_model, "method": "max", "skip": ["last"]})
    assert created.status_code == 202, created.text
    accepted = _exactly(QuantizationPublic, created.json())
    assert accepted.params["skip"] == ["last"] and accepted.params["method"] == "max"
    done = _exactly(QuantizationPublic, wait_for_job(api, f"/v1/quantizations/{accepted.id}"))
    assert isinstance(done, QuantizationPublic) and done.status == "succeeded", done.error
    assert done.result is not None and done.qdq_model_id == done.model_dump()["result"]["qdq_model_id"]
    listed = [doc for doc in api.get("/v1/quantizations").json() if doc["id"] == accepted.id]
    assert len(listed) == 1 and _exactly(QuantizationPublic, listed[0]).qdq_model_id == done.qdq_model_id
    assert _exactly(QuantizationPublic, api.delete(f"/v1/quantizations/{accepted.id}").json()) == done


def test_report_job_answers_are_job_documents(api: httpx.Client, fresh_model: dict[str, str]) -> None:
    build = api.post(
        "/v1/builds",
        json={"model_id": fresh_model["model_id"], "precision": "fp32", "backend": "onnxruntime"},
    )
    assert build.status_code in (200, 202), build.text
    engine_id = build.json()["engine_id"]
    if build.status_code == 202:
        assert wait_for_job(api, f"/v1/builds/{build.json()['id']}")["status"] == "succeeded"
    created = api.post(f"/v1/engines/{engine_id}/benchmark", json={"iterations": 2, "warmup": 0})
    assert created.status_code == 202, created.text
    report_id = created.json()["id"]
    listed = [doc for doc in api.get("/v1/reports").json() if doc["id"] == report_id]
    assert len(listed) == 1 and _exactly(JobPublic, listed[0]).kind == "benchmark"
    assert wait_for_job(api, f"/v1/reports/{report_id}")["status"] == "succeeded"
    cancelled = api.delete(f"/v1/reports/{report_id}")
    assert cancelled.status_code == 200 and _exactly(JobPublic, cancelled.json()).status == "succeeded"
