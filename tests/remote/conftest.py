"""A real API server that queues jobs in a real redis-server and takes remote workers (worker token set)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.server import running_server, settings_for

WORKER_TOKEN = "remote-worker-token-" + "0123456789abcdef" * 2


@dataclass(frozen=True)
class RemoteSetup:
    api: httpx.Client  # the API server, as users see it
    settings: Settings
    model_id: str
    calibration_set_id: str

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def worker_client(self, token: str = WORKER_TOKEN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-Worker-Token": token}, timeout=60)


@pytest.fixture(scope="module")
def remote_setup(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[RemoteSetup]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    root = tmp_path_factory.mktemp("api-host")
    settings = settings_for(root, queue_backend="redis", redis_url=redis_url, worker_token=WORKER_TOKEN)
    with running_server(settings) as api:
        model_id = api.post(
            "/v1/models", files={"file": ("classifier.onnx", model_bytes(resnet_block_classifier()))}
        ).json()["id"]
        set_id = api.post(
            "/v1/calibration-sets",
            files={"file": ("calib.npz", npz_bytes(input=classifier_samples(32)))},
            data={"model_id": model_id},
        ).json()["id"]
        yield RemoteSetup(api, settings, model_id, set_id)


def api_host_root(setup: RemoteSetup) -> Path:
    return setup.settings.database_path.parent


@contextmanager
def short_lease_server(root: Path, redis_url: str) -> Iterator[tuple[httpx.Client, Settings, str]]:
    """A server whose remote jobs lose their lease after 1 s of silence (swept every 0.1 s), with one
    queued fp32 build nobody has taken yet: yields the client, the settings and the job id."""
    import redis

    # Empty Redis, so a burst worker in the test takes this server's build and no other module's job.
    redis.Redis.from_url(redis_url).flushdb()
    settings = settings_for(
        root,
        queue_backend="redis",
        redis_url=redis_url,
        worker_token=WORKER_TOKEN,
        remote_job_lease_s=1.0,
        remote_lease_sweep_s=0.1,
    )
    with running_server(settings) as api:
        upload = api.post("/v1/models", files={"file": ("m.onnx", model_bytes(resnet_block_classifier()))})
        build = api.post(
            "/v1/builds",
            json={"model_id": upload.json()["id"], "precision": "fp32", "backend": "onnxruntime"},
        )
        assert build.status_code == 202, build.text
        yield api, settings, build.json()["id"]
