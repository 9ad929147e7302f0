"""The remote worker's own cache and its behaviour when the API server is away."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from service.errors import ApiUnreachable, BadInput
from service.remote.client import WorkerApi
from service.remote.rows import RemoteJobRows
from service.remote.storage import WorkerCache
from tests.server import free_port


def _entry(cache: WorkerCache, name: str, size: int, age_s: float) -> Path:
    path = cache.models / f"{name * 64}.onnx"
    path.write_bytes(b"\0" * size)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_the_cache_evicts_least_recently_used_entries_beyond_its_budget_but_spares_the_running_jobs(
    tmp_path: Path,
) -> None:
    cache = WorkerCache(tmp_path, budget_bytes=2500)
    oldest = _entry(cache, "a", 1000, age_s=300)
    in_use = _entry(cache, "b", 1000, age_s=200)
    newer = _entry(cache, "c", 1000, age_s=100)
    set_dir = cache.calibration / ("d" * 64)
    set_dir.mkdir()
    (set_dir / "input.npy").write_bytes(b"\0" * 1000)

    evicted = cache.prune(keep=[in_use])
    assert evicted == [oldest, newer]  # oldest first, skipping the one in use, until within budget
    assert in_use.exists() and set_dir.exists()
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) <= 2500


def test_a_new_cache_removes_old_download_leftovers_and_keeps_fresh_ones(tmp_path: Path) -> None:
    WorkerCache(tmp_path, budget_bytes=10**6)
    stale = tmp_path / "calibration" / ".tmp-crashed"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = tmp_path / "models" / ".tmp-downloading"
    fresh.write_bytes(b"partial")
    WorkerCache(tmp_path, budget_bytes=10**6)
    assert not stale.exists()
    assert fresh.exists()  # a sibling worker process may still be writing it


def test_ids_that_are_not_digests_never_become_paths(tmp_path: Path) -> None:
    cache = WorkerCache(tmp_path, budget_bytes=10**6)
    api = WorkerApi(f"http://127.0.0.1:{free_port()}", "t" * 32, retry_seconds=0)
    try:
        with pytest.raises(BadInput, match="not a model id"):
            cache.model(api, "../../etc/passwd")
        with pytest.raises(BadInput, match="not a calibration set id"):
            cache.calibration_set(api, "..")
    finally:
        api.close()


def test_an_unreachable_api_server_fails_claims_but_only_warns_about_progress(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = WorkerApi(f"http://127.0.0.1:{free_port()}", "t" * 32, retry_seconds=0.5)
    rows = RemoteJobRows(api, claimant="test-host/1")
    try:
        with pytest.raises(ApiUnreachable, match="ENGINE_SERVICE_API_URL"):
            rows.mark_running("job-1")
        with caplog.at_level(logging.WARNING, logger="service.remote.rows"):
            rows.update_progress("job-1", 0.5, "build")  # the build goes on
            assert rows.cancel_requested("job-1") is False
        assert "progress not recorded" in caplog.text
    finally:
        api.close()
