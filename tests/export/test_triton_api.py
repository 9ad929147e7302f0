"""GET /v1/engines/{id}/triton over real HTTP: the archive, its headers, and the errors.

One test puts a real ONNX Runtime engine into the server's engine cache directly (the same database
file and engines root, as a build worker does), so the route is exercised without build timing; the
other goes through POST /v1/builds like a client.
"""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.protobuf import text_format

from service.backends.base import BuildSpec, ShapeRange
from service.backends.registry import get_backend
from service.catalog.engine_keys import BuildConfig, EngineKey
from service.catalog.engines import EngineCache, NewEngine
from service.config import Settings
from service.store.db import Database
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.server import running_server, settings_for

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="tritonclient[grpc] (Triton's config schema) is not installed",
)

ROUTE = "/v1/engines/{engine_id}/triton"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[httpx.Client, Settings]]:
    settings = settings_for(tmp_path / "server")
    with running_server(settings) as client:
        yield client, settings


def _members(response: httpx.Response) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_the_triton_route_downloads_the_repository_of_a_cached_engine(
    server: tuple[httpx.Client, Settings],
) -> None:
    client, settings = server
    data = model_bytes(resnet_block_classifier(batch="N"))
    model_id = client.post("/v1/models", files={"file": ("classifier.onnx", data)}).json()["id"]

    shapes = {"input": ShapeRange((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))}
    built = get_backend("onnxruntime").build(data, BuildSpec(precision="fp32", shapes=shapes))
    key = EngineKey(model_id, BuildConfig(precision="fp32", shapes=tuple(shapes.items())), None, built.info)
    db = Database(settings.database_path)  # a second process's view of the same storage
    try:
        engine = EngineCache(db, settings.engines_dir, budget_bytes=1 << 30).store(
            NewEngine(key=key, built_model_id=model_id, engine_bytes=built.engine_bytes,
                      file_extension=built.file_extension, build_seconds=built.build_seconds, report={})
        )  # fmt: skip
    finally:
        db.close()

    response = client.get(f"/v1/engines/{engine.id}/triton")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    assert 'filename="classifier_fp32_onnxruntime.tar.gz"' in response.headers["content-disposition"]
    assert response.headers["x-triton-model-name"] == "classifier_fp32_onnxruntime"
    assert response.headers["x-triton-max-batch-size"] == "4"
    members = _members(response)
    assert members["classifier_fp32_onnxruntime/1/model.onnx"] == built.engine_bytes
    config = text_format.Parse(
        members["classifier_fp32_onnxruntime/config.pbtxt"].decode(), model_config_pb2.ModelConfig()
    )
    assert config.max_batch_size == 4 and list(config.input[0].dims) == [3, 16, 16]
    # The temporary archive is removed once sent (by a background task, just after the body went out).
    exports = settings.engines_dir / ".exports"
    deadline = time.monotonic() + 5
    while list(exports.glob("*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not list(exports.glob("*"))

    renamed = client.get(f"/v1/engines/{engine.id}/triton", params={"name": "classifier-v2"})
    assert "classifier-v2/config.pbtxt" in _members(renamed)

    bad = client.get(f"/v1/engines/{engine.id}/triton", params={"name": "../../etc"})
    assert bad.status_code == 400
    assert "not usable as a model directory" in bad.json()["error"]["message"]


def test_the_triton_route_answers_404_for_an_unknown_engine(server: tuple[httpx.Client, Settings]) -> None:
    client, _ = server
    response = client.get("/v1/engines/0123abcd/triton")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert "No engine with id '0123abcd'" in response.json()["error"]["message"]


def test_an_engine_built_through_the_api_exports_for_triton(server: tuple[httpx.Client, Settings]) -> None:
    client, _ = server
    data = model_bytes(resnet_block_classifier(batch=1, seed=3))
    model_id = client.post("/v1/models", files={"file": ("fixed.onnx", data)}).json()["id"]
    accepted = client.post(
        "/v1/builds", json={"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
    )
    assert accepted.status_code in (200, 202), accepted.text
    body = accepted.json()
    if body["cache"] == "miss":
        deadline = time.monotonic() + 120
        while True:
            build = client.get(f"/v1/builds/{body['id']}").json()
            if build["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline, f"the build did not finish: {build}"
            time.sleep(0.1)
        assert build["status"] == "succeeded", build
    engine_id = body["engine_id"]

    response = client.get(f"/v1/engines/{engine_id}/triton")
    assert response.status_code == 200
    members = _members(response)
    assert (
        members["fixed_fp32_onnxruntime/1/model.onnx"] == client.get(f"/v1/engines/{engine_id}/plan").content
    )
    config = text_format.Parse(
        members["fixed_fp32_onnxruntime/config.pbtxt"].decode(), model_config_pb2.ModelConfig()
    )
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3, 16, 16]
