"""Data files are private: 0600 files and 0700 folders, for what the server writes and what it finds.

A real ``serve`` process on a real data directory: a model, a calibration set and an engine are stored
through HTTP, then every path under the data roots is checked with ``lstat``. The process umask is set
where a service process starts, so the in-process (``engine-service local``) path is checked apart: it
leaves its caller's umask alone and makes the roots and the database private.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import httpx

from service.services import open_services
from service.store.file_modes import make_private
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.restart.server_process import DataDir, running
from tests.server import settings_for

DATA_ROOTS = ("models", "calibration_data", "engines")


def _loose_modes(root: Path) -> dict[str, str]:
    """Every data path whose mode lets another user in, with that mode."""
    loose: dict[str, str] = {}
    paths = [root / name for name in DATA_ROOTS]
    paths += [p for name in DATA_ROOTS for p in (root / name).rglob("*")]
    paths += list(root.glob("engine_service.db*"))
    for path in paths:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        wanted = 0o700 if stat.S_ISDIR(info.st_mode) else 0o600
        if stat.S_IMODE(info.st_mode) != wanted:
            loose[str(path.relative_to(root))] = oct(stat.S_IMODE(info.st_mode))
    return loose


def _wait(client: httpx.Client, path: str) -> dict[str, object]:
    deadline = time.monotonic() + 180
    while True:
        body: dict[str, object] = client.get(path).json()
        if body["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_everything_the_server_stores_is_private(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    previous = os.umask(0o022)  # the usual umask, inherited by the server: it must not depend on it
    try:
        with running(data, "server.log") as server:
            client = server.client
            model = client.post(
                "/v1/models", files={"file": ("c.onnx", model_bytes(resnet_block_classifier()))}
            )
            model_id = model.json()["id"]
            samples = npz_bytes(input=classifier_samples(8))
            calibration = client.post(
                "/v1/calibration-sets", files={"file": ("c.npz", samples)}, data={"model_id": model_id}
            )
            assert calibration.status_code == 201, calibration.text
            build = client.post(
                "/v1/builds", json={"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
            )
            assert _wait(client, f"/v1/builds/{build.json()['id']}")["status"] == "succeeded"
            stored = [p for name in DATA_ROOTS for p in (data.root / name).rglob("*") if p.is_file()]
            assert len(stored) >= 4  # model, set arrays and info, plan: there is something to check
            assert data.database.is_file()
            assert _loose_modes(data.root) == {}
    finally:
        os.umask(previous)


def test_files_left_readable_by_an_older_version_are_made_private_at_start(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    old_dir = data.calibration / ("a" * 64)
    old_dir.mkdir(parents=True, mode=0o755)
    (old_dir / "input.npy").write_bytes(b"old")
    (old_dir / "input.npy").chmod(0o644)
    data.models.mkdir(mode=0o755)
    (data.models / "stray.txt").write_text("x")
    (data.models / "stray.txt").chmod(0o666)
    outside = tmp_path / "outside.txt"
    outside.write_text("not service data")
    outside.chmod(0o644)
    (data.models / "link").symlink_to(outside)
    with running(data, "server.log") as server:
        assert server.client.get("/healthz").status_code == 200
        assert _loose_modes(data.root) == {}
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a link out of the root is not followed


def test_in_process_services_keep_the_callers_umask_and_make_roots_and_database_private(
    tmp_path: Path,
) -> None:
    previous = os.umask(0o022)
    try:
        services = open_services(settings_for(tmp_path))
        try:
            assert os.umask(0o022) == 0o022  # unchanged: `engine-service local` output keeps its mode
            for name in DATA_ROOTS:
                assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o700, name
            assert stat.S_IMODE((tmp_path / "engine_service.db").stat().st_mode) == 0o600
        finally:
            services.close(grace_seconds=1)
    finally:
        os.umask(previous)


def test_make_private_reports_what_it_changed_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "engines"
    (root / "plans").mkdir(parents=True)
    (root / "plans" / "p.plan").write_bytes(b"x")
    (root / "plans" / "p.plan").chmod(0o644)
    (root / "plans").chmod(0o755)
    root.chmod(0o755)
    database = tmp_path / "engine_service.db"
    database.write_bytes(b"")
    database.chmod(0o644)
    assert make_private([root], database) == 4
    assert make_private([root], database) == 0
