"""Calibration sets over real HTTP: formats, validation against a model, bad archives, nothing left behind."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.data_factory import classifier_samples, npy_bytes, npz_bytes, photo_zip
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder

PREPROCESS = json.dumps({"size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})


def _stored(root: Path) -> list[str]:
    base = root / "calibration_data"
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def classifier_id(api: httpx.Client) -> str:
    data = model_bytes(resnet_block_classifier(seed=21))
    return str(api.post("/v1/models", files={"file": ("cls.onnx", data)}).json()["id"])


def test_npz_upload_reports_samples_shapes_and_channel_stats(api: httpx.Client, classifier_id: str) -> None:
    samples = classifier_samples(24, seed=1)
    response = api.post(
        "/v1/calibration-sets",
        files={"file": ("set.npz", npz_bytes(input=samples))},
        data={"model_id": classifier_id},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "npz" and body["samples"] == 24
    (summary,) = body["inputs"]
    assert summary["name"] == "input" and summary["shape"] == [3, 16, 16] and summary["dtype"] == "float32"
    assert np.allclose(summary["stats"]["mean"], samples.mean(axis=(0, 2, 3)), atol=1e-4)
    assert np.allclose(summary["stats"]["max"], samples.max(axis=(0, 2, 3)), atol=1e-6)
    again = api.post("/v1/calibration-sets", files={"file": ("other-name.npz", npz_bytes(input=samples))})
    assert again.status_code == 200 and again.json()["id"] == body["id"]


def test_image_archive_is_preprocessed_into_model_inputs(api: httpx.Client, classifier_id: str) -> None:
    response = api.post(
        "/v1/calibration-sets",
        files={"file": ("photos.zip", photo_zip(12))},
        data={"preprocess": PREPROCESS, "model_id": classifier_id, "name": "photos"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "images" and body["samples"] == 12 and body["name"] == "photos"
    assert body["inputs"][0]["shape"] == [3, 16, 16]
    check = api.get(f"/v1/calibration-sets/{body['id']}/validate", params={"model_id": classifier_id})
    assert check.status_code == 200 and check.json()["valid"] is True


def test_same_archive_with_other_preprocessing_is_another_set(api: httpx.Client) -> None:
    archive = photo_zip(4)
    first = api.post(
        "/v1/calibration-sets", files={"file": ("a.zip", archive)}, data={"preprocess": PREPROCESS}
    )
    other = json.dumps({"size": [16, 16], "channel_order": "BGR"})
    second = api.post("/v1/calibration-sets", files={"file": ("a.zip", archive)}, data={"preprocess": other})
    assert first.status_code == 201 and second.status_code == 201
    assert first.json()["id"] != second.json()["id"]


def test_npy_upload_binds_to_a_single_input_model(api: httpx.Client, classifier_id: str) -> None:
    response = api.post(
        "/v1/calibration-sets",
        files={"file": ("x.npy", npy_bytes(classifier_samples(8, seed=3)))},
        data={"model_id": classifier_id},
    )
    assert response.status_code == 201, response.text
    assert response.json()["format"] == "npy"


def test_list_read_delete_and_unknown_ids(api: httpx.Client) -> None:
    set_id = api.post(
        "/v1/calibration-sets", files={"file": ("d.npz", npz_bytes(input=classifier_samples(4, seed=9)))}
    ).json()["id"]
    assert set_id in {s["id"] for s in api.get("/v1/calibration-sets").json()}
    assert api.get(f"/v1/calibration-sets/{set_id}").json()["samples"] == 4
    assert api.delete(f"/v1/calibration-sets/{set_id}").status_code == 204
    assert api.get(f"/v1/calibration-sets/{set_id}").status_code == 404
    assert api.delete(f"/v1/calibration-sets/{set_id}").status_code == 404


def _zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("wrong_input_name", "input"),
        ("wrong_rank", "rank"),
        ("wrong_dims", "16"),
        ("float16", "float16"),
        ("traversal", ".."),
        ("images_without_preprocess", "preprocess"),
        ("bad_preprocess_json", "preprocess"),
        ("unknown_preprocess_field", "preprocess"),
        ("not_an_array", "zip"),
    ],
)
def test_bad_calibration_uploads_are_400_and_store_nothing(
    api: httpx.Client, classifier_id: str, server_root: Path, case: str, message: str
) -> None:
    good = classifier_samples(4, seed=5)
    png = photo_zip(1)
    uploads = {
        "wrong_input_name": ({"file": ("s.npz", npz_bytes(image=good))}, {"model_id": classifier_id}),
        "wrong_rank": ({"file": ("s.npz", npz_bytes(input=good[:, 0]))}, {"model_id": classifier_id}),
        "wrong_dims": (
            {"file": ("s.npz", npz_bytes(input=np.zeros((4, 3, 8, 8), np.float32)))},
            {"model_id": classifier_id},
        ),
        "float16": (
            {"file": ("s.npz", npz_bytes(input=good.astype(np.float16)))},
            {"model_id": classifier_id},
        ),
        "traversal": ({"file": ("s.zip", _zip_with("../evil.png", png))}, {"preprocess": PREPROCESS}),
        "images_without_preprocess": ({"file": ("s.zip", png)}, {}),
        "bad_preprocess_json": ({"file": ("s.zip", png)}, {"preprocess": "{size: 16"}),
        "unknown_preprocess_field": (
            {"file": ("s.zip", png)},
            {"preprocess": json.dumps({"sizes": [16, 16]})},
        ),
        "not_an_array": ({"file": ("s.npz", b"PK\x03\x04 definitely not numpy")}, {}),
    }
    files, data = uploads[case]
    before = _stored(server_root)
    before_ids = {s["id"] for s in api.get("/v1/calibration-sets").json()}
    response = api.post("/v1/calibration-sets", files=files, data=data)
    assert response.status_code == 400, response.text
    assert message.lower() in response.json()["error"]["message"].lower()
    assert _stored(server_root) == before
    assert {s["id"] for s in api.get("/v1/calibration-sets").json()} == before_ids


def test_a_set_for_another_model_fails_validation_with_the_names(
    api: httpx.Client, classifier_id: str
) -> None:
    adder = api.post("/v1/models", files={"file": ("adder.onnx", model_bytes(two_input_adder()))}).json()[
        "id"
    ]
    set_id = api.post(
        "/v1/calibration-sets", files={"file": ("c.npz", npz_bytes(input=classifier_samples(4)))}
    ).json()["id"]
    response = api.get(f"/v1/calibration-sets/{set_id}/validate", params={"model_id": adder})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "image" in message and "bias_map" in message
    assert (
        api.get(f"/v1/calibration-sets/{set_id}/validate", params={"model_id": classifier_id}).status_code
        == 200
    )


def test_unknown_model_id_at_upload_is_404_and_stores_nothing(api: httpx.Client, server_root: Path) -> None:
    before = _stored(server_root)
    response = api.post(
        "/v1/calibration-sets",
        files={"file": ("s.npz", npz_bytes(input=classifier_samples(2)))},
        data={"model_id": "f" * 64},
    )
    assert response.status_code == 404
    assert _stored(server_root) == before
