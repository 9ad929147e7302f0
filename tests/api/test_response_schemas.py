"""Engine and calibration-set routes declare the JSON they answer with, and answer with exactly it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.api.schemas_engines import CalibrationSetPublic, CalibrationSetValidation
from tests.model_factory import model_bytes, resnet_block_classifier


def _schema_of(
    openapi: dict[str, Any], path: str, method: str = "get", status: str = "200"
) -> dict[str, Any]:
    schema = openapi["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    if schema.get("type") == "array":
        schema = schema["items"]
    name = schema["$ref"].rsplit("/", 1)[-1]
    resolved: dict[str, Any] = openapi["components"]["schemas"][name]
    return resolved


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/v1/engines", {"id", "backend", "precision", "layer_counts", "fusion_summary", "accuracy"}),
        ("/v1/engines/{engine_id}", {"id", "preparation", "kept_layers", "quantization"}),
        ("/v1/engines/{engine_id}/layers", {"engine_id", "source", "layers"}),
        ("/v1/engines/{engine_id}/fusions", {"engine_id", "backend", "device", "patterns", "summary"}),
        ("/v1/calibration-sets", {"id", "format", "samples", "inputs"}),
        ("/v1/calibration-sets/{set_id}", {"id", "format", "samples", "inputs"}),
        ("/v1/calibration-sets/{set_id}/validate", {"calibration_set_id", "model_id", "valid", "binding"}),
    ],
)
def test_the_routes_declare_their_answer_in_the_openapi_schema(
    api: httpx.Client, path: str, fields: set[str]
) -> None:
    schema = _schema_of(api.get("/openapi.json").json(), path)
    assert fields <= set(schema["properties"]), sorted(schema["properties"])


def test_the_calibration_set_upload_documents_both_of_its_answers(api: httpx.Client) -> None:
    operation = api.get("/openapi.json").json()["paths"]["/v1/calibration-sets"]["post"]
    for status in ("200", "201"):
        assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "CalibrationSetPublic"
        )


def test_calibration_set_answers_carry_exactly_the_declared_fields(api: httpx.Client, tmp_path: Path) -> None:
    model = api.post(
        "/v1/models", files={"file": ("block.onnx", model_bytes(resnet_block_classifier(seed=7)))}
    )
    assert model.status_code in (200, 201), model.text
    model_doc = model.json()
    name = model_doc["inputs"][0]["name"]
    shape = [1 if not isinstance(d, int) or d <= 0 else d for d in model_doc["inputs"][0]["shape"]]
    archive = tmp_path / "set.npz"
    np.savez(archive, **{name: np.random.default_rng(0).random([4, *shape[1:]], dtype=np.float32)})
    uploaded = api.post("/v1/calibration-sets", files={"file": ("set.npz", archive.read_bytes())})
    assert uploaded.status_code in (200, 201), uploaded.text
    declared = set(CalibrationSetPublic.model_fields)
    assert set(uploaded.json()) == declared
    set_id = uploaded.json()["id"]
    assert set(api.get(f"/v1/calibration-sets/{set_id}").json()) == declared
    listed = [item for item in api.get("/v1/calibration-sets").json() if item["id"] == set_id]
    assert [set(item) for item in listed] == [declared]
    validated = api.get(f"/v1/calibration-sets/{set_id}/validate", params={"model_id": model_doc["id"]})
    assert validated.status_code == 200, validated.text
    assert set(validated.json()) == set(CalibrationSetValidation.model_fields)
    assert validated.json()["valid"] is True
