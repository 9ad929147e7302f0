"""Ctrl-C while a command follows a job: cancel it on request, detach when nobody can be asked.

Builds are kept queued by long benchmarks that occupy every one of the server's job workers for the
whole module (cancelled at the end), and a real SIGINT is delivered to this process while the CLI polls.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import Result

from service.config import Settings
from tests.cli.conftest import Cli, json_of
from tests.data_factory import classifier_samples, npz_bytes

INTERRUPT_AFTER_S = 1.0


@pytest.fixture(scope="module")
def busy_worker(api: httpx.Client, fp32_engine_id: str) -> Iterator[list[str]]:
    """Occupy every job worker with a benchmark until the module is done, then cancel them."""
    workers = int(Settings.model_fields["job_workers"].default)  # the session server runs the default
    report_ids = []
    for index in range(workers):
        response = api.post(
            f"/v1/engines/{fp32_engine_id}/benchmark",
            json={"duration_s": 120 + index, "warmup": 0, "batch_sizes": [1]},
        )
        assert response.status_code == 202, response.text
        report_ids.append(str(response.json()["id"]))
    yield report_ids
    for report_id in report_ids:
        api.delete(f"/v1/reports/{report_id}")
    deadline = time.monotonic() + 60
    finished = ("succeeded", "failed", "cancelled")
    for report_id in report_ids:
        while api.get(f"/v1/reports/{report_id}").json()["status"] not in finished:
            assert time.monotonic() < deadline, "a blocking benchmark did not stop when cancelled"
            time.sleep(0.05)


def _interrupted(run: Cli, *args: str) -> Result:
    """Run the CLI and send this process SIGINT while it waits."""
    timer = threading.Timer(INTERRUPT_AFTER_S, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        return run(*args)
    finally:
        timer.cancel()
        timer.join()


def _queued_build(cli: Cli, api: httpx.Client, classifier_id: str, tmp_path: Path, seed: int) -> str:
    """A fresh INT8 build request (a new calibration set, so never a cache hit); its job id."""
    (tmp_path / "calib.npz").write_bytes(npz_bytes(input=classifier_samples(8, seed=seed)))
    calib = json_of(cli("calib", "upload", str(tmp_path / "calib.npz"), "--json"))
    response = api.post(
        "/v1/builds",
        json={
            "model_id": classifier_id,
            "precision": "int8",
            "backend": "onnxruntime",
            "calibration_set_id": calib["id"],
        },
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_ctrl_c_with_cancel_cancels_the_job_on_the_server(
    cli: Cli, api: httpx.Client, classifier_id: str, busy_worker: list[str], tmp_path: Path
) -> None:
    build_id = _queued_build(cli, api, classifier_id, tmp_path, seed=1020)

    result = _interrupted(cli, "builds", "wait", build_id, "--on-interrupt", "cancel")

    assert result.exit_code == 130
    assert f"error: Cancelled build {build_id}." in result.stderr
    assert api.get(f"/v1/builds/{build_id}").json()["status"] == "cancelled"


def test_waiting_on_a_cancelled_build_fails_with_its_state(
    cli: Cli, api: httpx.Client, classifier_id: str, busy_worker: list[str], tmp_path: Path
) -> None:
    build_id = _queued_build(cli, api, classifier_id, tmp_path, seed=1022)
    cancelled = json_of(cli("builds", "cancel", build_id, "--json"))

    result = cli("builds", "wait", build_id, "--json")

    assert cancelled["status"] == "cancelled"
    assert result.exit_code == 1 and result.stdout == ""
    assert f"error: Build {build_id} cancelled: cancelled before it started" in result.stderr


def test_ctrl_c_without_a_terminal_detaches_and_leaves_the_job_running(
    cli: Cli, api: httpx.Client, classifier_id: str, busy_worker: list[str], tmp_path: Path
) -> None:
    build_id = _queued_build(cli, api, classifier_id, tmp_path, seed=1021)

    result = _interrupted(cli, "builds", "wait", build_id)

    assert result.exit_code == 130
    assert f"Detached from build {build_id}; it keeps running on the server" in result.stderr
    assert f"engine-service builds wait {build_id}" in result.stderr
    assert api.get(f"/v1/builds/{build_id}").json()["status"] in ("queued", "running", "succeeded")
