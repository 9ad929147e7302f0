"""Job rows kept by the API server, seen from a remote worker: a :class:`~service.jobs.runner.JobRows`.

The executor and the job handlers run unchanged; what they would write into the database goes to
the API server instead. Two things keep the traffic small during long builds: log lines are buffered
and sent at most every ``log_flush_s`` (and always before the job is finished), and the cancel flag
is asked for at most every ``cancel_poll_s`` (progress and log answers refresh it too).

While it holds a job it renews the job's lease every ``heartbeat_s`` from a thread of its own
(:mod:`service.jobs.leases`): a backend build reports nothing for minutes, and a lease that ran out
would fail the job as lost. Once the server says the job has ended, the beats stop and the handler
is told to stop too.

Reporting is best effort while the job runs: a progress or log call that fails is logged here and the
build goes on. Claiming and finishing are not: they raise when the server cannot be reached, so RQ
records the failure and the job's row is failed by the next worker's maintenance.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from service.errors import Conflict, NotFound, ServiceError
from service.jobs.leases import HEARTBEAT_INTERVAL_S
from service.jobs.records import LOG_LIMIT_CHARS, JobRecord, JobStatus
from service.remote.client import WorkerApi

logger = logging.getLogger(__name__)


def record_from(body: dict[str, Any]) -> JobRecord:
    return JobRecord(
        id=body["id"],
        kind=body["kind"],
        status=body["status"],
        phase=body["phase"],
        progress=float(body["progress"]),
        params=body["params"],
        result=body.get("result"),
        error=body.get("error"),
        log="",  # a worker only appends to the log
        dedupe_key=None,
        owner=None,
        cancel_requested=bool(body["cancel_requested"]),
        created_at=body["created_at"],
        started_at=body.get("started_at"),
        finished_at=body.get("finished_at"),
    )


class RemoteJobRows:
    def __init__(
        self,
        api: WorkerApi,
        *,
        claimant: str,
        log_flush_s: float = 0.5,
        cancel_poll_s: float = 2.0,
        heartbeat_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        self.api = api
        self.claimant = claimant
        self.log_flush_s = log_flush_s
        self.cancel_poll_s = cancel_poll_s
        self.heartbeat_s = heartbeat_s
        self._beating: dict[str, threading.Event] = {}  # job id -> set to stop its heartbeat thread
        self._lock = threading.Lock()
        self._pending_log: dict[str, list[str]] = {}
        self._flushed_at: dict[str, float] = {}
        self._cancel: dict[str, tuple[bool, float]] = {}  # job id -> (flag, when it was learnt)

    def location(self) -> str:
        return f"the API server at {self.api.base_url}"

    def get(self, job_id: str, *, kind: str | None = None) -> JobRecord:
        record = record_from(self.api.job(job_id))
        if kind is not None and record.kind != kind:
            raise NotFound(f"No {kind} job with id '{job_id}'.")
        return record

    def mark_running(self, job_id: str) -> bool:
        # One claimant per attempt: a claim retried after a lost answer is recognised as ours.
        try:
            self.api.claim(job_id, f"{self.claimant}/{uuid.uuid4().hex}")
        except Conflict:
            return False
        self._start_beating(job_id)
        return True

    def update_progress(self, job_id: str, progress: float, phase: str | None) -> None:
        self._report(job_id, "progress", lambda: self.api.progress(job_id, progress, phase))

    def heartbeat(self, job_id: str) -> bool:
        """Renew the job's lease on the server (service.jobs.leases); False once the job has ended there."""
        return self._report(job_id, "heartbeat", lambda: self.api.heartbeat(job_id))

    def _report(self, job_id: str, what: str, send: Callable[[], bool]) -> bool:
        """Send one report about a running job; its answer carries the cancel flag. False when the
        server says the job has ended (409: failed as lost, say), which makes the handler stop too."""
        try:
            self._learn_cancel(job_id, send())
        except Conflict:
            self._learn_cancel(job_id, True)
            return False
        except ServiceError as exc:
            logger.warning("job %s: %s not recorded on the API server: %s", job_id, what, exc.message)
        return True

    def _start_beating(self, job_id: str) -> None:
        # A backend build reports nothing for minutes at a time; the lease must not run out meanwhile.
        done = threading.Event()
        with self._lock:
            self._beating[job_id] = done

        def beat() -> None:
            while not done.wait(self.heartbeat_s) and self.heartbeat(job_id):
                pass

        threading.Thread(target=beat, name=f"heartbeat-{job_id[:8]}", daemon=True).start()

    def append_log(self, job_id: str, lines: str) -> None:
        with self._lock:
            self._pending_log.setdefault(job_id, []).append(lines)
            due = time.monotonic() - self._flushed_at.get(job_id, 0.0) >= self.log_flush_s
        if due:
            self.flush_log(job_id)

    def flush_log(self, job_id: str) -> None:
        with self._lock:
            text = "".join(self._pending_log.pop(job_id, []))
            self._flushed_at[job_id] = time.monotonic()
        if text:
            self._report(job_id, "log lines", lambda: self.api.append_log(job_id, text[-LOG_LIMIT_CHARS:]))

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        self.flush_log(job_id)
        try:
            self.api.finish(job_id, status, result=result, error=error)
            return True
        except Conflict as exc:
            # Already final: a retried finish whose first answer was lost, or the server failed it.
            logger.warning(
                "job %s: the API server did not take the final state %s: %s", job_id, status, exc.message
            )
            return False
        finally:
            with self._lock:
                self._cancel.pop(job_id, None)
                self._flushed_at.pop(job_id, None)
                beating = self._beating.pop(job_id, None)
            if beating is not None:
                beating.set()

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            flag, learnt = self._cancel.get(job_id, (False, 0.0))
        if flag or time.monotonic() - learnt < self.cancel_poll_s:
            return flag
        try:
            flag = self.api.cancel_requested(job_id)
        except ServiceError as exc:
            logger.warning("job %s: cannot ask the API server about cancellation: %s", job_id, exc.message)
        self._learn_cancel(job_id, flag)
        return flag

    def _learn_cancel(self, job_id: str, flag: bool) -> None:
        with self._lock:
            self._cancel[job_id] = (flag, time.monotonic())
