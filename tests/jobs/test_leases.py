"""Leases on remotely run jobs, against a real SQLite database."""

from __future__ import annotations

from pathlib import Path

from service.jobs.leases import LOST_REASON, LeaseSweeper
from service.jobs.records import JobRecord, JobStore
from service.store.db import Database


def _running(store: JobStore, *, claimant: str | None) -> str:
    record, _ = store.create("build", {"x": 1}, dedupe_key=None, owner=None)
    assert store.mark_running(record.id, claimant=claimant)
    return record.id


def _age_heartbeat(store: JobStore, job_id: str, iso: str) -> None:
    store.db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ?", (iso, job_id))


def test_a_silent_remote_job_is_failed_and_a_beating_or_local_one_is_left_running(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "jobs.db"))
    silent = _running(store, claimant="gpu-host/a1b2c3d4")
    beating = _running(store, claimant="gpu-host/e5f6a7b8")
    local = _running(store, claimant=None)  # run by this host's own threads: no lease
    _age_heartbeat(store, silent, "2020-01-01T00:00:00.000+00:00")
    _age_heartbeat(store, beating, "2020-01-01T00:00:00.000+00:00")
    assert store.beat(beating)

    finished: list[JobRecord] = []
    sweeper = LeaseSweeper(store, lease_s=60, interval_s=3600, on_failed=finished.append)
    assert sweeper.sweep() == [silent]

    lost = store.get(silent)
    assert lost.status == "failed" and lost.error == LOST_REASON
    assert LOST_REASON in lost.log
    assert [r.id for r in finished] == [silent]
    assert store.get(beating).status == "running" and store.get(local).status == "running"
    assert not store.beat(silent)  # an ended job takes no more beats
    assert sweeper.sweep() == []


def test_a_claim_retried_by_the_same_claimant_is_answered_yes_and_another_claimant_no(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "jobs.db"))
    record, _ = store.create("build", {}, dedupe_key=None, owner=None)
    assert store.mark_running(record.id, claimant="host-a/1")
    assert store.mark_running(record.id, claimant="host-a/1")
    assert not store.mark_running(record.id, claimant="host-b/2")
    assert not store.mark_running(record.id)
    assert store.get(record.id).claimed_by == "host-a/1"
