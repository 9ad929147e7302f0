"""The embedded job runner: success, failure, cancellation, single-flight, restart recovery."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.errors import BadInput, LimitExceeded
from service.jobs.records import INTERRUPTED_REASON, JobRecord, JobStore
from service.jobs.runner import SHUTDOWN_REASON, JobContext, JobRunner
from service.store.db import Database


def _wait_final(store: JobStore, job_id: str, timeout: float = 10) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = store.get(job_id)
        if not record.active:
            return record
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} did not finish: {store.get(job_id)}")


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(Database(tmp_path / "jobs.db"))


def test_a_job_reports_progress_phase_log_and_result(store: JobStore) -> None:
    def handler(ctx: JobContext) -> dict[str, Any]:
        ctx.phase("calibrate", 0.2)
        ctx.log("two batches done")
        ctx.progress(0.9)
        return {"answer": ctx.params["x"] * 2}

    runner = JobRunner(store)
    runner.register("double", handler)
    runner.start()
    record, created = runner.submit("double", {"x": 21})
    assert created and record.status == "queued"
    final = _wait_final(store, record.id)
    assert final.status == "succeeded"
    assert final.result == {"answer": 42}
    assert final.progress == 1.0
    assert final.phase == "calibrate"
    assert any("two batches done" in line for line in final.log_tail())
    runner.stop(1)


def test_a_failing_job_records_the_error_message(store: JobStore) -> None:
    def handler(ctx: JobContext) -> dict[str, Any]:
        raise BadInput("calibration set does not fit input 'x'")

    runner = JobRunner(store)
    runner.register("fail", handler)
    runner.start()
    final = _wait_final(store, runner.submit("fail", {})[0].id)
    assert final.status == "failed"
    assert final.error == "calibration set does not fit input 'x'"
    runner.stop(1)


def test_cancelling_a_running_job_stops_it_at_the_next_check(store: JobStore) -> None:
    started = threading.Event()

    def handler(ctx: JobContext) -> dict[str, Any]:
        started.set()
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    runner = JobRunner(store)
    runner.register("loop", handler)
    runner.start()
    record, _ = runner.submit("loop", {})
    assert started.wait(5)
    runner.cancel(record.id)
    final = _wait_final(store, record.id)
    assert final.status == "cancelled"
    runner.stop(1)


def test_identical_active_jobs_are_submitted_once(store: JobStore) -> None:
    release = threading.Event()

    def handler(ctx: JobContext) -> dict[str, Any]:
        release.wait(5)
        return {}

    runner = JobRunner(store)
    runner.register("build", handler)
    runner.start()
    first, created_first = runner.submit("build", {}, dedupe_key="k1")
    second, created_second = runner.submit("build", {}, dedupe_key="k1")
    assert created_first and not created_second
    assert second.id == first.id
    release.set()
    assert _wait_final(store, first.id).status == "succeeded"
    third, created_third = runner.submit("build", {}, dedupe_key="k1")  # finished jobs do not dedupe
    assert created_third and third.id != first.id
    runner.stop(2)


def test_a_restart_fails_running_jobs_and_requeues_queued_ones(tmp_path: Path) -> None:
    db_path = tmp_path / "jobs.db"
    store = JobStore(Database(db_path))
    running, _ = store.create("work", {}, dedupe_key=None, owner=None)
    store.mark_running(running.id)
    queued, _ = store.create("work", {}, dedupe_key=None, owner=None)
    store.db.close()

    store = JobStore(Database(db_path))
    runner = JobRunner(store)
    runner.register("work", lambda ctx: {"ran": True})
    runner.start()
    assert store.get(running.id).status == "failed"
    assert store.get(running.id).error == INTERRUPTED_REASON
    assert _wait_final(store, queued.id).result == {"ran": True}
    runner.stop(1)


def test_shutdown_fails_jobs_that_do_not_finish_within_the_grace_period(store: JobStore) -> None:
    started = threading.Event()

    def handler(ctx: JobContext) -> dict[str, Any]:
        started.set()
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    runner = JobRunner(store)
    runner.register("loop", handler)
    runner.start()
    record, _ = runner.submit("loop", {})
    assert started.wait(5)
    runner.stop(grace_seconds=0.2)
    final = store.get(record.id)
    assert final.status == "failed"
    assert final.error == SHUTDOWN_REASON


def test_per_owner_active_job_limit_is_enforced(store: JobStore) -> None:
    release = threading.Event()
    runner = JobRunner(store, max_active_per_owner=1)
    runner.register("wait", lambda ctx: {"ok": release.wait(5)})
    runner.start()
    runner.submit("wait", {}, owner="key-a")
    with pytest.raises(LimitExceeded, match="limit 1"):
        runner.submit("wait", {}, owner="key-a")
    runner.submit("wait", {}, owner="key-b")  # other keys are unaffected
    release.set()
    runner.stop(5)
