"""One job asked for by two keys (single-flight): both own it, and one key's cancel only lets go of it.

Real services on a real SQLite database; the runner is not started, so the job stays queued while the
rules are checked (no sleep, no race with a worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.api.tenancy import cancel_owned, owned_job
from service.builds.submit import BUILD_JOB
from service.errors import NotFound
from service.services import Services, open_services
from service.store.owners import Principal
from tests.server import settings_for

ALICE, BOB, ADMIN = Principal("key_alice"), Principal("key_bob"), Principal("key_root", admin=True)
PARAMS = {"engine_id": "e" * 64, "model_id": "m" * 64}


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    opened = open_services(settings_for(tmp_path))
    try:
        yield opened
    finally:
        opened.close(grace_seconds=1)


def test_a_joined_job_is_both_keys_and_one_cancel_only_lets_go(services: Services) -> None:
    first, created = services.runner.submit(BUILD_JOB, PARAMS, dedupe_key="same", owner=ALICE.owner)
    joined, joined_created = services.runner.submit(BUILD_JOB, PARAMS, dedupe_key="same", owner=BOB.owner)
    assert created and not joined_created and joined.id == first.id
    assert services.owners.owners("job", first.id) == [ALICE.owner, BOB.owner]
    assert [r.id for r in services.jobs.list(kind=BUILD_JOB, principal=BOB)] == [first.id]

    after_bob = cancel_owned(services, BOB, owned_job(services, BOB, first.id, kind=BUILD_JOB))
    assert after_bob.status == "queued"  # it runs on for alice
    with pytest.raises(NotFound):
        owned_job(services, BOB, first.id, kind=BUILD_JOB)
    assert services.jobs.list(kind=BUILD_JOB, principal=BOB) == []

    after_alice = cancel_owned(services, ALICE, owned_job(services, ALICE, first.id, kind=BUILD_JOB))
    assert after_alice.status == "cancelled"  # its last holder cancelled it


def test_an_admin_cancel_stops_a_shared_job_for_everyone(services: Services) -> None:
    job, _ = services.runner.submit(BUILD_JOB, PARAMS, dedupe_key="admin", owner=ALICE.owner)
    services.runner.submit(BUILD_JOB, PARAMS, dedupe_key="admin", owner=BOB.owner)
    assert cancel_owned(services, ADMIN, owned_job(services, ADMIN, job.id)).status == "cancelled"


def test_a_succeeded_jobs_results_go_to_every_owner(services: Services) -> None:
    job, _ = services.runner.submit(BUILD_JOB, PARAMS, dedupe_key="results", owner=ALICE.owner)
    services.runner.submit(BUILD_JOB, PARAMS, dedupe_key="results", owner=BOB.owner)
    assert services.jobs.mark_running(job.id)
    result = {"engine_id": "f" * 64, "precision_choice": {"int8": {"engine_id": "a" * 64}}}
    assert services.jobs.finish(job.id, "succeeded", result=result)
    for principal in (ALICE, BOB):
        assert services.owners.visible_ids("engine", principal) == {"f" * 64, "a" * 64}
