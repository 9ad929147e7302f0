"""With auth off the local owner's queue is bounded too: a flood of jobs gets 429 with Retry-After.

The probe jobs (tests/auth/probe_routes.py) go through the real runner and hold their place until
released, so the bound is met deterministically; the build after them is a real build request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.auth.probe_routes import RELEASE, probe_server, wait_until_idle
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.server import settings_for

BOUND = 3


@pytest.fixture
def local_server(tmp_path: Path) -> Iterator[httpx.Client]:
    settings = settings_for(tmp_path, max_queued_jobs_per_owner=BOUND, job_workers=1)
    RELEASE.clear()
    try:
        with probe_server(settings) as client:
            try:
                yield client
            finally:
                RELEASE.set()
                wait_until_idle(client, {})
    finally:
        RELEASE.set()


def test_the_local_owner_cannot_queue_more_than_the_bound_and_is_told_when_to_retry(
    local_server: httpx.Client,
) -> None:
    accepted = [local_server.post("/_test/jobs") for _ in range(BOUND)]
    assert [r.status_code for r in accepted] == [202] * BOUND
    assert {r.json()["owner"] for r in accepted} == {"local"}

    refused = local_server.post("/_test/jobs")
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) > 0
    error = refused.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert f"(limit {BOUND})" in error["message"]
    assert "ENGINE_SERVICE_MAX_QUEUED_JOBS_PER_OWNER" in error["message"]
    assert error["details"] == {
        "limit": BOUND,
        "active": BOUND,
        "setting": "ENGINE_SERVICE_MAX_QUEUED_JOBS_PER_OWNER",
    }

    # A build meets the same bound (nothing queues ahead of it without limit) and is accepted once
    # the queue drains.
    model_id = local_server.post(
        "/v1/models", files={"file": ("c.onnx", model_bytes(resnet_block_classifier(seed=5)))}
    ).json()["id"]
    build = {"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
    assert local_server.post("/v1/builds", json=build).status_code == 429
    RELEASE.set()
    wait_until_idle(local_server, {})
    assert local_server.post("/v1/builds", json=build).status_code == 202
