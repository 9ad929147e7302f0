"""A real API server that queues jobs in a real redis-server and takes remote workers (worker token set)."""

from __future__ import annotations

from collections.abc import Iterator
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
