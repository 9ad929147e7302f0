"""A real server whose app has two extra test routes, for behaviour no production route exposes yet.

- ``POST /_test/jobs`` submits a ``probe`` job through the real runner with the caller's key id (or,
  with auth off, the local owner) as owner; the job runs until :data:`RELEASE` is set. It exercises
  job limits (429) and the job metrics without a model, a calibration set or a backend.
- ``GET /_test/fail`` raises an exception no handler knows, to check the 500 answer and its log line.

Everything else (middleware, auth, runner, database, uvicorn) is the production app unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import tests.server
from service.api.deps import current_owner
from service.config import Settings
from service.jobs.runner import JobContext

PROBE_JOB = "probe"
RELEASE = threading.Event()


class ProbeFailure(RuntimeError):
    """Raised by ``GET /_test/fail``."""


def _probe_job(ctx: JobContext) -> dict[str, Any]:
    while not RELEASE.wait(0.02):
        ctx.check_cancelled()
    return {"owner_checked": True}


def _with_probe_routes(app: FastAPI) -> FastAPI:
    @app.post("/_test/jobs", status_code=202)
    def submit_probe_job(request: Request) -> JSONResponse:
        services = request.app.state.services
        services.runner.register(PROBE_JOB, _probe_job)
        record, _ = services.runner.submit(PROBE_JOB, {}, owner=current_owner(request))
        return JSONResponse(status_code=202, content={"id": record.id, "owner": record.owner})

    @app.get("/_test/fail")
    def fail() -> None:
        raise ProbeFailure("deliberate failure for the 500 test")

    return app


@contextmanager
def probe_server(settings: Settings) -> Iterator[httpx.Client]:
    """``tests.server.running_server`` with the probe routes added to the production app."""
    original = tests.server.create_app
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tests.server, "create_app", lambda s: _with_probe_routes(original(s)))
        with tests.server.running_server(settings) as client:
            patch.undo()
            yield client


def wait_until_idle(client: httpx.Client, headers: dict[str, str], timeout: float = 10.0) -> None:
    """Wait until the server's job gauge shows no queued or running probe job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = client.get("/metrics", headers=headers).text
        busy = [
            line
            for line in text.splitlines()
            if line.startswith(f'engine_service_jobs{{kind="{PROBE_JOB}",state="')
            and ('state="queued"' in line or 'state="running"' in line)
            and not line.endswith(" 0.0")
        ]
        if not busy:
            return
        time.sleep(0.02)
    raise AssertionError("probe jobs did not finish")
