"""Build workers: take jobs from Redis for given targets and run them on a job executor here.

A :class:`JobWorker` runs an RQ worker on its targets' queues plus, optionally, the generic one
(:mod:`service.jobs.redis_queue`), and runs every job it takes through a
:class:`~service.jobs.runner.JobExecutor`: the API server's own runner on its machine, or a remote
executor on another host. The ``engine-service worker`` command (:mod:`service.cli.worker`) picks which.
Either way handlers, progress, logs, cancellation and the shutdown grace period behave as in the
embedded runner.

RQ's ``SimpleWorker`` runs each job in this process rather than in a forked child: a CUDA context
does not survive ``fork``, backends keep loaded libraries between builds, and the SQLite connection
must not be shared with a child. One worker runs one job at a time; run one worker per GPU.

RQ finds ``execute_job`` by its import path, so the job function reaches the worker's executor through
a context variable the worker sets in its own thread (several workers can share a process in tests).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import AbandonedJobError
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from service.errors import NotFound
from service.jobs.redis_queue import GENERIC_QUEUE, RedisJobQueue, queue_name
from service.jobs.runner import JobExecutor, JobTarget

logger = logging.getLogger(__name__)

ABANDONED_REASON = (
    "interrupted: the worker running this job stopped without finishing it (its process or host was lost); "
    "nothing it produced was kept. Submit the same request again to retry."
)
# Check for dead workers' jobs every minute (RQ's default is ten): a lost build should not look
# "running" for long.
MAINTENANCE_INTERVAL_S = 60


@dataclass(frozen=True)
class _Binding:
    runner: JobExecutor
    label: str


_binding: ContextVar[_Binding | None] = ContextVar("engine_service_worker", default=None)


def execute_job(job_id: str) -> str:
    """RQ's entry point: run the row ``job_id`` on this worker's runner; returns its final status."""
    binding = _binding.get()
    if binding is None:
        raise RuntimeError(
            "execute_job runs only inside `engine-service worker`; another kind of RQ worker took it."
        )
    rows = binding.runner.rows
    try:
        rows.get(job_id)
    except NotFound:
        # The API server queued a row this worker cannot see: they do not share one database or API.
        logger.error(
            "job %s is not in %s; a worker must use the API server's database "
            "(ENGINE_SERVICE_DATABASE_PATH) or, on another host, its URL (ENGINE_SERVICE_API_URL)",
            job_id,
            rows.location(),
        )
        raise
    if not binding.runner.execute(job_id, taken_by=binding.label):
        return "skipped"  # cancelled while it waited, or already taken
    return rows.get(job_id).status


def job_failed(
    job: Job,
    connection: Redis,
    exc_type: type[BaseException],
    exc: BaseException,
    tb: TracebackType | None,
) -> None:
    """RQ's failure callback: fail the row when RQ gives up on its job (a dead worker, or a crash
    outside the handler, which the runner would otherwise have recorded itself)."""
    binding = _binding.get()
    if binding is None:
        logger.warning("RQ job %s failed outside an engine-service worker; its row is left as it is", job.id)
        return
    rows = binding.runner.rows
    try:
        record = rows.get(job.id)
    except NotFound:
        return  # execute_job logged why
    if not record.active:
        return
    reason = (
        ABANDONED_REASON
        if isinstance(exc, AbandonedJobError)
        else f"the worker failed while running this job: {exc_type.__name__}: {exc}"
    )
    rows.append_log(job.id, f"{time.strftime('%H:%M:%S')} {reason}\n")
    rows.finish(job.id, "failed", error=reason)


PUBSUB_WAIT_S = 0.5  # how long RQ's command channel blocks per read (see _RqWorker.subscribe)


class _RqWorker(SimpleWorker):
    """RQ's in-process worker, plus heartbeats during long jobs and the runner's shutdown grace."""

    # No SIGALRM: jobs have no RQ timeout, and a worker may run outside the main thread.
    death_penalty_class = TimerDeathPenalty

    def __init__(self, *args: Any, on_warm_stop: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_warm_stop = on_warm_stop

    def subscribe(self) -> None:
        # RQ's pub/sub thread waits in get_message holding the PubSub lock for up to its sleep time
        # (60 s), and unsubscribe() at shutdown needs that lock: a worker that stopped right after the
        # thread began waiting hung for a minute (seen as flaky burst workers under load). A short
        # wait bounds shutdown at a fraction of a second for one idle read per interval.
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]  # rq annotates None
            sleep_time=PUBSUB_WAIT_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        done = threading.Event()
        # SimpleWorker sends no heartbeats while its job runs; without them RQ would declare any build
        # longer than its heartbeat timeout (seven minutes for jobs without a timeout) abandoned.
        beat = threading.Thread(
            target=self._beat, args=(job, execution, done), name=f"{self.name}-heartbeat", daemon=True
        )
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            done.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Execution, done: threading.Event) -> None:
        while not done.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except RedisError as exc:
                logger.warning("worker %s: heartbeat failed: %s", self.name, exc)

    def _install_signal_handlers(self) -> None:
        # Signal handlers can only be installed from the main thread; a worker embedded in a thread is
        # stopped by its owner instead.
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        # Warm shutdown (SIGTERM/SIGINT): RQ takes no new job; the running one gets the grace period.
        if self.get_state() == WorkerStatus.BUSY and self._on_warm_stop is not None:
            self._on_warm_stop()
        super().request_stop(signum, frame)


class JobWorker:
    """One RQ worker that runs the jobs of ``targets`` (and, with ``generic``, untargeted jobs)."""

    def __init__(
        self,
        runner: JobExecutor,
        queue: RedisJobQueue,
        targets: Sequence[JobTarget],
        *,
        generic: bool = True,
        name: str | None = None,
        grace_seconds: float = 240.0,
        job_monitoring_interval: int = 30,
    ) -> None:
        self.runner = runner
        self.queue = queue
        self.targets = tuple(t for t in targets if not t.is_any)
        self.queue_names = tuple(dict.fromkeys(queue_name(t) for t in self.targets)) + (
            (GENERIC_QUEUE,) if generic else ()
        )
        if not self.queue_names:
            raise ValueError("a worker needs at least one target or the generic queue")
        self.grace_seconds = grace_seconds
        self._rq = _RqWorker(
            list(self.queue_names),
            name=name,
            connection=queue.connection,
            serializer=JSONSerializer,
            maintenance_interval=MAINTENANCE_INTERVAL_S,
            job_monitoring_interval=job_monitoring_interval,
            on_warm_stop=self._start_grace_period,
        )
        self.name = self._rq.name
        self.label = f"worker {self.name} on {socket.gethostname()}"

    def run(self, *, burst: bool = False) -> bool:
        """Work until stopped (or, with ``burst``, until the queues are empty); True if any job ran."""
        self.queue.register_targets(self.targets)
        with self._bound():
            return bool(self._rq.work(burst=burst, logging_level=None))

    def recover_abandoned(self, *, now: float | None = None) -> None:
        """Fail the rows of jobs whose worker died on this worker's queues.

        RQ runs this check in its periodic maintenance; ``now`` (a Unix time) lets a caller look past
        the heartbeat timeout at once.
        """
        with self._bound():
            for name in self.queue_names:
                queue = Queue(name, connection=self.queue.connection, serializer=JSONSerializer)
                registry = StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty)
                registry.cleanup(timestamp=now)

    @contextmanager
    def _bound(self) -> Iterator[None]:
        token = _binding.set(_Binding(self.runner, self.label))
        try:
            yield
        finally:
            _binding.reset(token)

    def _start_grace_period(self) -> None:
        # runner.stop waits up to the grace period for the running job, then makes it unwind through
        # its cancellation checks and records it failed with the shutdown reason.
        threading.Thread(
            target=self.runner.stop, args=(self.grace_seconds,), name="worker-shutdown", daemon=True
        ).start()
