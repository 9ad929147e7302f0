"""The embedded job runner: a queue, worker threads, progress, logs and cancellation.

Long work (quantization, builds, benchmarks, evaluations) runs here, never inside a request. Each
job kind has one handler ``handler(ctx) -> result dict``; the handler reports through its
:class:`JobContext` and checks ``ctx.check_cancelled()`` between steps. Rows live in SQLite
(:mod:`service.jobs.records`), so status survives the process.

Where a queued job waits is pluggable (:class:`JobQueue`). The default :class:`LocalJobQueue` is the
embedded runner: this process's worker threads take the jobs, and on start the runner fails the jobs a
dead process left running and re-queues the ones that never started. With a remote queue
(:mod:`service.jobs.redis_queue`) this process only dispatches; worker processes run the jobs with
a :class:`JobExecutor` (on this machine through the database, on others through the API server's
worker routes), and the rows stay the single source of truth either way. Every job carries
a :class:`JobTarget`: the backend identity a build needs, or any worker for the rest.

Kinds registered ``exclusive`` (latency measurements) run alone on the host: with a
:class:`~service.jobs.host_gate.HostGate`, an exclusive job waits (status running, phase "waiting for
the host") until every other job of this host has finished, and no other job starts while it runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.errors import JobCancelled, LimitExceeded, ServiceError
from service.jobs.host_gate import HostGate
from service.jobs.records import JobRecord, JobStatus, JobStore
from service.store.owners import LOCAL_OWNER

logger = logging.getLogger(__name__)

JobHandler = Callable[["JobContext"], dict[str, Any]]
SHUTDOWN_REASON = "the server shut down before this job finished; submit the same request again to retry."
_PROGRESS_WRITE_INTERVAL_S = 0.25


class JobRows(Protocol):
    """The job-row operations that running a job needs.

    :class:`~service.jobs.records.JobStore` (the service database) is one; a remote worker's rows go
    through the API server instead (:class:`service.remote.rows.RemoteJobRows`).
    """

    def location(self) -> str:
        """Where the rows live, for messages."""
        ...

    def get(self, job_id: str, *, kind: str | None = None) -> JobRecord: ...

    def mark_running(self, job_id: str) -> bool: ...

    def update_progress(self, job_id: str, progress: float, phase: str | None) -> None: ...

    def append_log(self, job_id: str, lines: str) -> None: ...

    def finish(
        self,
        job_id: str,
        status: JobStatus,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> bool:
        """Record the final state; False when the row did not take it (already final)."""
        ...

    def cancel_requested(self, job_id: str) -> bool: ...


@dataclass
class JobContext:
    """What a running handler sees: its params and the means to report and to stop."""

    job_id: str
    kind: str
    params: dict[str, Any]
    _store: JobRows
    _stopping: threading.Event
    _last_write: float = 0.0
    _phase: str | None = None
    _progress: float = 0.0
    _cancel_checked_at: float = field(default=0.0)
    _cancelled: bool = False
    exclusive: bool = False  # the job holds the host alone (see HostGate)
    waited_s: float = 0.0  # how long it waited for the host before its handler started

    def progress(self, fraction: float, phase: str | None = None) -> None:
        """Record progress in [0, 1]; phase changes are written at once, fractions throttled."""
        fraction = min(max(fraction, 0.0), 1.0)
        now = time.monotonic()
        phase_changed = phase is not None and phase != self._phase
        self._progress = fraction
        if phase_changed:
            self._phase = phase
        if phase_changed or now - self._last_write >= _PROGRESS_WRITE_INTERVAL_S:
            self._store.update_progress(self.job_id, fraction, phase if phase_changed else None)
            self._last_write = now

    def phase(self, name: str, fraction: float | None = None) -> None:
        self.log(f"phase: {name}")
        self.progress(self._progress if fraction is None else fraction, name)

    def log(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self._store.append_log(
            self.job_id, "".join(f"{stamp} {line}\n" for line in message.splitlines() or [""])
        )

    def should_stop(self) -> bool:
        """True when cancellation was requested or the server is shutting down (cheap to poll)."""
        if self._cancelled or self._stopping.is_set():
            return True
        now = time.monotonic()
        if now - self._cancel_checked_at >= 0.1:
            self._cancel_checked_at = now
            self._cancelled = self._store.cancel_requested(self.job_id)
        return self._cancelled

    def check_cancelled(self) -> None:
        if self.should_stop():
            raise JobCancelled(f"Job {self.job_id} was cancelled.")


@dataclass(frozen=True)
class JobTarget:
    """Which workers may run a job: those that build for one backend identity, or (all None) any worker."""

    backend: str | None = None
    version: str | None = None
    device: str | None = None
    compute_capability: str | None = None

    @property
    def is_any(self) -> bool:
        return self.backend is None

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> JobTarget:
        """The target of a job from its params: build jobs carry ``key`` with the backend identity."""
        key = params.get("key")
        if not isinstance(key, Mapping):
            return cls()
        backend, version, device = key.get("backend"), key.get("backend_version"), key.get("device")
        if not (isinstance(backend, str) and isinstance(version, str) and isinstance(device, str)):
            return cls()
        capability = key.get("compute_capability")
        return cls(backend, version, device, capability if isinstance(capability, str) else None)


class JobQueue(Protocol):
    """Where a queued job waits until a worker takes it."""

    def put(self, job_id: str, target: JobTarget) -> None:
        """Hand a queued job to the workers that can run ``target``. Putting a job twice runs it once
        (the row's queued -> running transition admits one taker); raise ServiceError when it cannot be
        queued."""
        ...

    def discard(self, job_id: str) -> None:
        """Forget a job cancelled before it started (best effort: a taker skips it anyway)."""
        ...

    def worker_targets(self) -> list[JobTarget]:
        """The build targets that live workers of this queue serve (none for the embedded queue)."""
        ...


class LocalJobQueue:
    """The embedded queue: jobs wait in memory for this process's runner threads."""

    def __init__(self) -> None:
        self._ids: queue.Queue[str | None] = queue.Queue()

    def put(self, job_id: str, target: JobTarget) -> None:
        self._ids.put(job_id)  # every local thread can run every kind, so the target does not matter

    def discard(self, job_id: str) -> None:
        return None  # the row is already cancelled; the thread that takes it skips it

    def worker_targets(self) -> list[JobTarget]:
        return []  # this process's threads build with this process's backends

    def take(self) -> str | None:
        """Block until a job id arrives; None tells the calling thread to exit."""
        return self._ids.get()

    def release(self) -> None:
        """Make one thread blocked in :meth:`take` exit."""
        self._ids.put(None)


class JobExecutor:
    """Runs jobs of the registered kinds to their final state, recording everything in ``rows``.

    This is what every worker has, in the API process or in a worker process on any host; the
    :class:`JobRunner` adds submitting, cancelling and the embedded worker threads on top.
    """

    def __init__(self, rows: JobRows, *, gate: HostGate | None = None) -> None:
        self.rows = rows
        self.gate = gate
        self._exclusive_kinds: set[str] = set()
        self._handlers: dict[str, JobHandler] = {}
        self._stopping = threading.Event()
        self._running: dict[str, JobContext] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[JobRecord], None]] = []

    def register(self, kind: str, handler: JobHandler, *, exclusive: bool = False) -> None:
        """Run ``kind`` jobs with ``handler``; ``exclusive`` ones alone on the host (with a gate)."""
        self._handlers[kind] = handler
        if exclusive:
            self._exclusive_kinds.add(kind)
        else:
            self._exclusive_kinds.discard(kind)

    def is_exclusive(self, kind: str) -> bool:
        return kind in self._exclusive_kinds

    def _admitted(self, ctx: JobContext) -> AbstractContextManager[float]:
        """Hold the host gate for the job (exclusive or shared); nullcontext without a gate."""
        if self.gate is None:
            return nullcontext(0.0)
        ctx.exclusive = ctx.kind in self._exclusive_kinds
        announced: list[bool] = []

        def waiting(seconds: float) -> None:
            ctx.check_cancelled()
            if not announced:  # at once: a waiting job must not look like one competing for the CPUs
                announced.append(True)
                what = (
                    "every other job on this host to finish" if ctx.exclusive else "a latency job to finish"
                )
                ctx.phase(f"waiting for {what}")
                ctx.log(
                    "latency is measured alone on the host: waiting until no other job runs"
                    if ctx.exclusive
                    else "a latency measurement holds the host alone: waiting until it ends"
                )

        return self.gate.exclusive(waiting) if ctx.exclusive else self.gate.shared(waiting)

    def add_listener(self, listener: Callable[[JobRecord], None]) -> None:
        """Called with the final record of every finished job (metrics hook)."""
        self._listeners.append(listener)

    def notify_finished(self, record: JobRecord) -> None:
        """Tell the listeners a job ended (also for jobs a remote worker ran and reported)."""
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:
                logger.exception("job listener failed")

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Give running jobs ``grace_seconds`` to finish, then make them unwind and fail cleanly."""
        self._wait_then_stop(time.monotonic() + grace_seconds)

    def _wait_then_stop(self, deadline: float) -> None:
        while self.running_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stopping.set()  # handlers polling should_stop() now unwind

    def execute(self, job_id: str, *, taken_by: str | None = None) -> bool:
        """Run one queued job to its final state here; False when it was no longer queued.

        Local threads call this, and so do remote workers for the jobs they take from their queue;
        ``taken_by`` names the worker in the job's log.
        """
        if not self.rows.mark_running(job_id):
            return False  # cancelled while queued, or another worker took it first
        record = self.rows.get(job_id)
        ctx = JobContext(
            job_id=job_id, kind=record.kind, params=record.params, _store=self.rows, _stopping=self._stopping
        )
        if taken_by:
            ctx.log(f"taken by {taken_by}")
        handler = self._handlers.get(record.kind)
        if handler is None:
            kinds = ", ".join(sorted(self._handlers))
            reason = f"this worker does not run '{record.kind}' jobs; it runs {kinds}."
            ctx.log(f"failed: {reason}")
            self.rows.finish(job_id, "failed", error=reason)
            return True
        with self._lock:
            self._running[job_id] = ctx
        started = time.monotonic()
        try:
            with self._admitted(ctx) as waited:
                ctx.waited_s = waited
                result = handler(ctx)
        except JobCancelled:
            if self._stopping.is_set():
                ctx.log(SHUTDOWN_REASON)
                self.rows.finish(job_id, "failed", error=SHUTDOWN_REASON)
            else:
                ctx.log("cancelled on request")
                self.rows.finish(job_id, "cancelled", error="cancelled on request")
        except ServiceError as exc:
            ctx.log(f"failed: {exc.message}")
            self.rows.finish(job_id, "failed", error=exc.message)
        except Exception as exc:
            ctx.log("failed with an unexpected error:\n" + traceback.format_exc(limit=8))
            self.rows.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
        except BaseException:  # SystemExit/KeyboardInterrupt (a worker's cold shutdown): record, then go
            ctx.log(SHUTDOWN_REASON)
            self.rows.finish(job_id, "failed", error=SHUTDOWN_REASON)
            raise
        else:
            ctx.log(f"succeeded in {time.monotonic() - started:.2f} s")
            self.rows.finish(job_id, "succeeded", result=result)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        self.notify_finished(self.rows.get(job_id))
        return True


class JobRunner(JobExecutor):
    """The API side of jobs: submit and cancel them, and run them on worker threads (local queue) or
    hand them to a remote queue whose worker processes run them."""

    def __init__(
        self,
        store: JobStore,
        *,
        workers: int = 1,
        max_active_per_owner: int | None = None,
        owner_limit: Callable[[str], int | None] | None = None,
        queue: JobQueue | None = None,
        gate: HostGate | None = None,
        limit_setting: str = "ENGINE_SERVICE_MAX_CONCURRENT_JOBS_PER_KEY",
    ) -> None:
        super().__init__(store, gate=gate)
        self.store = store
        self.workers = workers
        self.max_active_per_owner = max_active_per_owner
        self.limit_setting = limit_setting  # named in the 429, so an operator knows what to raise
        # Per-owner override of max_active_per_owner (an API key's own limit); None means "use the default".
        self.owner_limit = owner_limit
        self.queue: JobQueue = queue if queue is not None else LocalJobQueue()
        self._threads: list[threading.Thread] = []

    @property
    def runs_locally(self) -> bool:
        """True when this process's threads run the jobs (the embedded runner)."""
        return isinstance(self.queue, LocalJobQueue)

    def start(self) -> None:
        """Re-queue what never started; with the local queue also fail what a dead process left running
        and start the worker threads. (With a remote queue, running rows belong to live workers.)"""
        if self.runs_locally:
            interrupted = self.store.mark_interrupted()
            if interrupted:
                logger.warning("marked %d interrupted job(s) failed", interrupted)
        queued: list[str] = self.store.queued_ids()
        for job_id in queued:
            self.queue.put(job_id, JobTarget.of(self.store.get(job_id).params))
        if not isinstance(self.queue, LocalJobQueue):
            return
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._work, args=(self.queue,), name=f"job-worker-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def submit(
        self,
        kind: str,
        params: Mapping[str, Any],
        *,
        dedupe_key: str | None = None,
        owner: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a job; with a dedupe key an identical active job is returned instead (created=False)."""
        if kind not in self._handlers:
            raise ServiceError(f"No handler registered for job kind '{kind}'.")
        if owner is not None and self.max_active_per_owner is not None:
            own_limit = self.owner_limit(owner) if self.owner_limit is not None else None
            limit = own_limit if own_limit is not None else self.max_active_per_owner
            active = self.store.count_active(owner=owner)
            if active >= limit:
                who = "You already have" if owner == LOCAL_OWNER else "This API key already has"
                raise LimitExceeded(
                    f"{who} {active} queued or running jobs (limit {limit}); wait for one to finish "
                    f"or cancel one, or ask the operator to raise {self.limit_setting}"
                    + (" or the key's max_concurrent_jobs." if owner != LOCAL_OWNER else "."),
                    details={"limit": limit, "active": active, "setting": self.limit_setting},
                )
        record, created = self.store.create(kind, dict(params), dedupe_key=dedupe_key, owner=owner)
        if created:
            try:
                self.queue.put(record.id, JobTarget.of(record.params))
            except ServiceError as exc:  # never leave a queued row that no worker will ever see
                self.store.finish(record.id, "failed", error=exc.message)
                raise
        return record, created

    def cancel(self, job_id: str, *, kind: str | None = None) -> JobRecord:
        record = self.store.request_cancel(self.store.get(job_id, kind=kind).id)
        if record.status == "cancelled" and record.started_at is None:
            self.queue.discard(record.id)
        return record

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop taking jobs, give running ones ``grace_seconds`` to finish, then fail them cleanly."""
        deadline = time.monotonic() + grace_seconds
        if isinstance(self.queue, LocalJobQueue):
            for _ in self._threads:
                self.queue.release()
        self._wait_then_stop(deadline)
        for thread in self._threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        self._threads.clear()

    def _work(self, local: LocalJobQueue) -> None:
        while True:
            job_id = local.take()
            if job_id is None:
                return
            try:
                self.execute(job_id)
            except Exception:  # the worker must survive anything a handler or the DB throws
                logger.exception("job %s crashed the worker loop", job_id)
