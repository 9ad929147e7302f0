"""Schema-driven testing: requests generated from the app's own OpenAPI schema never get a 5xx.

A dedicated server (real uvicorn on loopback, default settings, auth off) is seeded with a model, a
calibration set and an ONNX Runtime engine, then schemathesis generates requests for every operation
in ``/openapi.json`` (valid and invalid bodies, query strings, path ids, uploads of arbitrary bytes)
and checks each answer: no server error, and a response that matches the schema (status codes,
content types, bodies). About half of the generated model, calibration-set and engine ids are swapped
for the seeded ones, so the routes also run past their lookups on real data (inference included).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.server import running_server, settings_for

pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True)
class Seeded:
    """The running server and the ids of what it holds."""

    client: httpx.Client
    ids: dict[str, str]  # parameter name -> an id that exists


@pytest.fixture(scope="module")
def seeded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """A server holding a model, a calibration set and an engine, so routes have content to serve."""
    root: Path = tmp_path_factory.mktemp("schemathesis")
    with running_server(settings_for(root)) as client:
        model = client.post(
            "/v1/models", files={"file": ("classifier.onnx", model_bytes(resnet_block_classifier()))}
        )
        assert model.status_code == 201, model.text
        calibration = client.post(
            "/v1/calibration-sets",
            files={"file": ("samples.npz", npz_bytes(input=classifier_samples(8)))},
            data={"model_id": model.json()["id"]},
        )
        assert calibration.status_code == 201, calibration.text
        build = client.post(
            "/v1/builds", json={"model_id": model.json()["id"], "precision": "fp32", "backend": "onnxruntime"}
        )
        assert build.status_code == 202, build.text
        deadline = time.monotonic() + 120
        while (job := client.get(f"/v1/builds/{build.json()['id']}").json())["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, f"the seed engine was not built in time: {job}"
            time.sleep(0.05)
        assert job["status"] == "succeeded", job
        ids = {
            "model_id": model.json()["id"],
            "set_id": calibration.json()["id"],
            "engine_id": job["engine_id"],
        }
        yield Seeded(client, ids)


# Inference bodies of these types are opaque bytes to schemathesis, like octet-stream.
schemathesis.serializer.alias(["application/x-npz", "application/x-numpy"], "application/octet-stream")


def with_known_ids(case: schemathesis.Case, ids: dict[str, str]) -> None:
    """Point about half of the generated ids at objects that exist, so routes get past their 404.

    The choice hangs on the generated value, so a failing example replays the same way. Only reads
    and inference get real ids: deleting the seeds would turn every later request into a 404, and
    benchmark or evaluation jobs on them would keep the machine busy after the test.
    """
    method = case.method.upper()
    if not (method == "GET" or (method == "POST" and case.path.endswith("/infer"))):
        return
    for container in (case.path_parameters, case.query):
        if not isinstance(container, dict):
            continue
        for name, value in list(container.items()):
            if name in ids and zlib.crc32(repr(value).encode()) % 2 == 0:
                container[name] = ids[name]


# The schema is loaded at import (schemathesis's lazy fixture loader does not work with pytest 9.2);
# building the app only declares routes, nothing is opened until a server's lifespan starts.
schema = schemathesis.openapi.from_dict(create_app(settings_for(Path("unused-schema-only"))).openapi())


@schema.parametrize()
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case: schemathesis.Case, seeded_server: Seeded) -> None:
    with_known_ids(case, seeded_server.ids)
    case.call_and_validate(
        base_url=str(seeded_server.client.base_url),
        checks=[
            not_a_server_error,
            response_schema_conformance,
            status_code_conformance,
            content_type_conformance,
        ],
        timeout=60,
    )
