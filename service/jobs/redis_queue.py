"""The Redis-backed job queue: RQ carries queued job ids to worker processes on any host.

The job rows (:mod:`service.jobs.records`) stay the source of truth for status, progress, log,
cancellation and single-flight; Redis only carries "job <id> is waiting" to a worker that can run it.
Jobs are routed by :class:`~service.jobs.runner.JobTarget`: a build for backend B, version V on
device D waits in the RQ queue ``builds:B:V:<hash of D>``, every other job in ``jobs``. A worker
(:mod:`service.jobs.worker`, started by ``engine-service worker``) listens on the queues of the
targets it can build, plus ``jobs``.

Each RQ job calls ``service.jobs.worker.execute_job(<row id>)`` and carries the row's id as its own,
so queueing the same row twice is refused atomically by RQ (``unique``). Jobs are JSON-serialized
(nothing is unpickled from Redis), have no RQ timeout (builds take what they take; stopping one goes
through the row's cancel flag), and name a failure callback that fails the row when RQ gives up on
a job whose worker died.

``rq`` and ``redis`` are the optional ``redis`` extra; they are imported when a queue is opened, so
this module imports anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from service.errors import BackendUnavailable
from service.jobs.runner import JobTarget

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger(__name__)

GENERIC_QUEUE = "jobs"
BUILD_QUEUE_PREFIX = "builds"
# Redis hash: queue name -> JSON of the target it serves, written by workers when they start.
TARGETS_KEY = "engine-service:targets"
EXECUTE_FUNCTION = "service.jobs.worker.execute_job"
FAILURE_CALLBACK = "service.jobs.worker.job_failed"
# RQ's own result records are only bookkeeping (the row has the real result); keep them a while for
# `rq info` and dashboards, then let Redis expire them.
RESULT_TTL_S = 24 * 3600
FAILURE_TTL_S = 7 * 24 * 3600
_WAITING = ("queued", "started", "deferred", "scheduled")
_MISSING_EXTRA = (
    "The Redis job queue needs the 'redis' extra (packages rq and redis): "
    "pip install 'engine-service[redis]', or set ENGINE_SERVICE_QUEUE_BACKEND=embedded."
)


def queue_name(target: JobTarget) -> str:
    """The RQ queue a job for ``target`` waits in.

    The device string is long and free-form (GPU name, targeted architectures), so it enters the
    name as a hash; backend and version stay readable for ``rq info``.
    """
    if target.is_any:
        return GENERIC_QUEUE
    identity = f"{target.device}\n{target.compute_capability or ''}".encode()
    digest = hashlib.sha256(identity).hexdigest()[:16]
    return f"{BUILD_QUEUE_PREFIX}:{_readable(target.backend)}:{_readable(target.version)}:{digest}"


def _readable(text: str | None) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-+" else "_" for ch in text or "")


def _target_to_json(target: JobTarget) -> str:
    return json.dumps(
        {
            "backend": target.backend,
            "version": target.version,
            "device": target.device,
            "compute_capability": target.compute_capability,
        },
        sort_keys=True,
    )


def _target_from_json(text: str | bytes) -> JobTarget:
    data = json.loads(text)
    return JobTarget(data["backend"], data["version"], data["device"], data.get("compute_capability"))


class RedisJobQueue:
    """A :class:`~service.jobs.runner.JobQueue` whose jobs ``engine-service worker`` processes take."""

    def __init__(self, connection: Redis, *, url: str = "") -> None:
        self.connection = connection
        self.url = url or "(connection)"

    @classmethod
    def connect(cls, url: str) -> RedisJobQueue:
        """Open the queue at a ``redis://`` URL; BackendUnavailable when the extra or Redis is missing."""
        try:
            from redis import Redis
            from redis.exceptions import RedisError
        except ImportError as exc:
            raise BackendUnavailable(_MISSING_EXTRA) from exc
        try:
            connection = Redis.from_url(url)
            connection.ping()
        except (RedisError, ValueError) as exc:
            raise BackendUnavailable(
                f"Cannot reach Redis at {_redacted(url)} ({exc}); start it, or fix ENGINE_SERVICE_REDIS_URL."
            ) from exc
        return cls(connection, url=url)

    def put(self, job_id: str, target: JobTarget) -> None:
        """Queue the row ``job_id`` for ``target``'s workers; a no-op when RQ already holds it waiting."""
        from redis.exceptions import RedisError
        from rq.exceptions import DuplicateJobError

        try:
            try:
                self._enqueue(job_id, target)
            except DuplicateJobError:
                if self._status(job_id) in _WAITING:
                    return
                # A finished or failed RQ record of an earlier attempt holds the id: replace it. A
                # concurrent put may win the race; that one's record serves as well.
                self._delete(job_id)
                try:
                    self._enqueue(job_id, target)
                except DuplicateJobError:
                    return
        except RedisError as exc:
            raise BackendUnavailable(
                f"Could not queue job {job_id}: Redis at {_redacted(self.url)} is unreachable ({exc}). "
                "Nothing will run it; submit the request again once Redis is back."
            ) from exc

    def discard(self, job_id: str) -> None:
        """Drop a job cancelled before it started from its queue (a worker would skip it anyway)."""
        from redis.exceptions import RedisError

        try:
            self._delete(job_id)
        except RedisError as exc:
            logger.warning("could not remove cancelled job %s from Redis: %s", job_id, exc)

    def waiting(self, target: JobTarget) -> int:
        """How many jobs wait in ``target``'s queue."""
        return int(self._queue(queue_name(target)).count)

    def register_targets(self, targets: Iterable[JobTarget]) -> None:
        """Record which target each build queue serves (workers call this when they start)."""
        mapping: dict[Any, Any] = {
            queue_name(target): _target_to_json(target) for target in targets if not target.is_any
        }
        if mapping:
            self.connection.hset(TARGETS_KEY, mapping=mapping)

    def worker_targets(self) -> list[JobTarget]:
        """The build targets at least one live worker listens for (RQ's worker registry says who lives)."""
        from redis.exceptions import RedisError
        from rq.serializers import JSONSerializer
        from rq.worker import Worker

        try:
            listening = {
                name
                for worker in Worker.all(connection=self.connection, serializer=JSONSerializer)
                for name in worker.queue_names()
            }
            known: dict[Any, Any] = self.connection.hgetall(TARGETS_KEY)  # type: ignore[assignment]
        except RedisError as exc:
            raise BackendUnavailable(
                f"Cannot reach Redis at {_redacted(self.url)} to see which workers are live ({exc}); "
                "start it, or fix ENGINE_SERVICE_REDIS_URL."
            ) from exc
        targets = []
        for raw_name, raw_target in known.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            if name in listening:
                targets.append(_target_from_json(raw_target))
        return sorted(targets, key=lambda t: (t.backend or "", t.version or "", t.device or ""))

    def _queue(self, name: str) -> Any:
        from rq import Queue
        from rq.serializers import JSONSerializer

        return Queue(name, connection=self.connection, serializer=JSONSerializer)

    def _enqueue(self, job_id: str, target: JobTarget) -> None:
        from rq import Callback

        self._queue(queue_name(target)).enqueue_call(
            EXECUTE_FUNCTION,
            args=(job_id,),
            job_id=job_id,
            timeout=-1,
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            description=f"engine-service job {job_id}",
            on_failure=Callback(FAILURE_CALLBACK),
            unique=True,
        )

    def _status(self, job_id: str) -> str | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        from rq.serializers import JSONSerializer

        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return None
        status = job.get_status()
        return str(status.value) if status is not None else None

    def _delete(self, job_id: str) -> None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        from rq.serializers import JSONSerializer

        try:
            Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer).delete()
        except NoSuchJobError:
            return


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{host}"
