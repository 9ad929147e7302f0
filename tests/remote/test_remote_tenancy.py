"""Remote builds keep their owner: a key's build run by a remote worker is that key's job and engine.

A real API server with auth on and a real redis-server; the worker is `engine-service worker --api-url`
in its own process, which talks to the API host with the worker token only (no API key).
"""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from service.auth.keys import KeyStore
from service.store.db import Database
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.remote.conftest import WORKER_TOKEN, RemoteSetup
from tests.remote.test_remote_worker import _run_worker
from tests.server import running_server, settings_for

pytest.importorskip("rq", reason="the 'redis' extra (rq, redis) is not installed")


@pytest.fixture
def auth_remote(tmp_path: Path, redis_url: str) -> Iterator[tuple[RemoteSetup, dict[str, str]]]:
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    settings = settings_for(
        tmp_path / "api-host",
        auth_enabled=True,
        queue_backend="redis",
        redis_url=redis_url,
        worker_token=WORKER_TOKEN,
    )
    with running_server(settings) as api:
        db = Database(settings.database_path)
        try:
            store = KeyStore(db)
            keys = {name: store.create(name) for name in ("alice", "bob")}
        finally:
            db.close()
        tokens = {name: issued.token for name, issued in keys.items()}
        tokens["alice_id"] = keys["alice"].key.id
        alice = {"X-API-Key": tokens["alice"]}
        model_id = api.post(
            "/v1/models",
            files={"file": ("c.onnx", model_bytes(resnet_block_classifier(seed=9)))},
            headers=alice,
        ).json()["id"]
        yield RemoteSetup(api, settings, model_id, ""), tokens


def test_a_build_run_by_a_remote_worker_stays_its_keys_job_and_engine(
    auth_remote: tuple[RemoteSetup, dict[str, str]], tmp_path: Path
) -> None:
    setup, tokens = auth_remote
    alice, bob = {"X-API-Key": tokens["alice"]}, {"X-API-Key": tokens["bob"]}
    accepted = setup.api.post(
        "/v1/builds",
        json={"model_id": setup.model_id, "precision": "fp32", "backend": "onnxruntime"},
        headers=alice,
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]

    done = _run_worker(setup, tmp_path / "far-host", "--api-url", setup.url, "--name", "far-away")
    assert done.returncode == 0, done.stderr[-3000:]

    job = setup.api.get(f"/v1/builds/{job_id}", headers=alice).json()
    assert job["status"] == "succeeded", job
    assert "taken by worker far-away" in "\n".join(job["log_tail"])
    engine_id = job["engine_id"]
    assert setup.api.get(f"/v1/engines/{engine_id}/plan", headers=alice).status_code == 200
    for path in (f"/v1/builds/{job_id}", f"/v1/engines/{engine_id}"):
        hidden = setup.api.get(path, headers=bob)
        assert hidden.status_code == 404, (path, hidden.text)
    assert engine_id not in {e["id"] for e in setup.api.get("/v1/engines", headers=bob).json()}
    with closing(sqlite3.connect(setup.settings.database_path)) as conn:
        (owner,) = conn.execute("SELECT owner FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert owner == tokens["alice_id"]  # the worker's claim and report left the submitter in place
    cached = [p for p in (tmp_path / "far-host" / "cache").rglob("*") if not p.is_symlink()]
    assert cached and all(
        stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600) for p in cached
    ), {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in cached}
