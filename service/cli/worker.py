"""The ``engine-service worker`` command: run jobs from Redis for the targets this host can build.

It works out which targets it can build from the backend registry and runs a
:class:`~service.jobs.worker.JobWorker` on those targets' queues plus the generic one. On the API
server's machine it opens the same storage (data roots and metadata database from the settings) and
runs jobs through the services' :class:`~service.jobs.runner.JobRunner`; on another host
(``--api-url``) it opens no database and runs builds through the API server instead
(:mod:`service.remote.worker`).

Importing this module needs the optional ``redis`` extra (rq, redis).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from service.backends.registry import backend_names
from service.builds.targets import local_targets
from service.config import get_settings
from service.errors import ServiceError
from service.jobs.redis_queue import RedisJobQueue
from service.jobs.worker import JobWorker
from service.observability.logging import configure_logging
from service.remote.worker import run_remote_worker
from service.services import open_services

logger = logging.getLogger(__name__)


def run_worker(
    *,
    backends: Sequence[str] = (),
    generic: bool = True,
    burst: bool = False,
    grace_seconds: float = 240.0,
    name: str | None = None,
    api_url: str | None = None,
) -> int:
    """The ``engine-service worker`` command; returns the process exit code.

    With an API URL (``api_url`` or ``ENGINE_SERVICE_API_URL``) this is a remote worker
    (:mod:`service.remote.worker`), which runs builds only (``generic`` does not apply); otherwise it
    shares the API server's database on this host.
    """
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json, file=settings.log_file)
    if settings.private_data:  # a worker writes engines, models and calibration data too
        from service.store.file_modes import private_umask

        private_umask()
    if api_url is not None:
        if not api_url.strip():  # e.g. compose's ${ENGINE_SERVICE_API_URL:-} left unset: never run locally
            logger.error("--api-url is empty: give the API server's URL (ENGINE_SERVICE_API_URL in compose)")
            return 2
        settings = settings.model_copy(update={"api_url": api_url.strip()})
    if not settings.redis_url.strip():
        logger.error("ENGINE_SERVICE_REDIS_URL is empty: give the Redis the API server queues jobs in")
        return 2
    if settings.queue_backend != "redis":
        logger.error(
            "ENGINE_SERVICE_QUEUE_BACKEND is '%s': the API server runs jobs itself and queues none in Redis. "
            "Set it to 'redis' for the server and for every worker.",
            settings.queue_backend,
        )
        return 2
    try:
        queue = RedisJobQueue.connect(settings.redis_url)
        targets = local_targets(backends)
    except ServiceError as exc:
        logger.error("%s", exc.message)
        return 2
    unknown = sorted(set(backends) - set(backend_names()))
    if unknown:
        logger.error("unknown backend(s) %s; choose from %s", unknown, ", ".join(backend_names()))
        return 2
    if backends and not targets:
        logger.error("none of the backends %s can build on this host", list(backends))
        return 2
    if settings.api_url:  # on another host than the API server: everything goes through its API
        return run_remote_worker(
            settings, queue, targets, burst=burst, grace_seconds=grace_seconds, name=name
        )
    if not targets and not generic:
        logger.error(
            "no backend can build on this host and --no-generic was given: this worker would take nothing"
        )
        return 2
    services = open_services(settings)
    try:
        worker = JobWorker(
            services.runner, queue, targets, generic=generic, name=name, grace_seconds=grace_seconds
        )
        logger.info("%s listens on %s", worker.label, ", ".join(worker.queue_names))
        worker.run(burst=burst)
    finally:
        services.close(grace_seconds)
    return 0
