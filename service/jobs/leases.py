"""Leases on jobs that remote workers run: a job whose worker stops beating is failed, not left running.

A remote worker beats for its running job every :data:`HEARTBEAT_INTERVAL_S` (and with every progress
or log report). The API server sweeps every ``interval_s``: a remotely claimed job whose last beat is
older than the lease is failed with :data:`LOST_REASON`. This bounds how long a lost host (power cut,
network partition, SIGKILL) can hold a build "running", whether or not another worker of the same
target ever runs RQ's maintenance. A partitioned worker that comes back finds its job ended: the
server refuses its reports with 409 and the worker stops the build.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from service.jobs.records import JobRecord, JobStore

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 20.0
LOST_REASON = (
    "interrupted: the remote worker running this job stopped reporting (its host or network was lost); "
    "nothing it produced was kept. Submit the same request again to retry."
)


class LeaseSweeper:
    """A daemon thread that fails remote jobs whose lease ran out."""

    def __init__(
        self,
        jobs: JobStore,
        *,
        lease_s: float,
        interval_s: float,
        on_failed: Callable[[JobRecord], None] | None = None,
    ) -> None:
        self.jobs = jobs
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.on_failed = on_failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-lease-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sweep(self) -> list[str]:
        """Fail what expired now; returns the job ids."""
        expired = self.jobs.fail_silent(self.lease_s, LOST_REASON)
        for job_id in expired:
            logger.warning("job %s: its remote worker stopped reporting; failed", job_id)
            if self.on_failed is not None:
                self.on_failed(self.jobs.get(job_id))
        return expired

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:  # a busy or closing database must not end the sweeping for good
                logger.exception("sweeping remote job leases failed")
