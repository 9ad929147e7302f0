"""``engine-service worker --api-url URL``: a build worker on another host than the API server.

It opens no database and shares no volume with the API server. It takes build jobs for the targets
this host can build from Redis, like any worker, and does everything else through the API server's
worker routes: claims the job, downloads the model and calibration set into its own cache, reports
progress, log and cancellation, builds here, and uploads the engine, which the server verifies and
stores in its engine cache. Untargeted jobs (quantization, reports) need the API's database, so a
remote worker never listens on the generic queue.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from service import __version__
from service.builds.pipeline import BuildPipeline
from service.builds.submit import BUILD_JOB
from service.catalog.engine_keys import PREPARATION_VERSION
from service.config import Settings
from service.errors import ServiceError
from service.jobs.leases import HEARTBEAT_INTERVAL_S
from service.jobs.redis_queue import RedisJobQueue
from service.jobs.runner import JobContext, JobExecutor, JobTarget
from service.jobs.worker import JobWorker
from service.remote.client import WorkerApi
from service.remote.rows import RemoteJobRows
from service.remote.storage import RemoteBuildStorage, WorkerCache
from service.store.file_modes import make_private

logger = logging.getLogger(__name__)


def remote_executor(
    api: WorkerApi, cache: WorkerCache, *, heartbeat_s: float = HEARTBEAT_INTERVAL_S
) -> JobExecutor:
    """An executor whose rows and build storage are the API server's."""
    claimant = f"{socket.gethostname()}/{uuid.uuid4().hex[:12]}"
    executor = JobExecutor(RemoteJobRows(api, claimant=claimant, heartbeat_s=heartbeat_s))

    def build(ctx: JobContext) -> dict[str, Any]:
        storage = RemoteBuildStorage(api, cache, ctx.job_id)
        try:
            return BuildPipeline(storage).handle(ctx)
        finally:
            storage.release()

    executor.register(BUILD_JOB, build)
    return executor


def connect(settings: Settings) -> WorkerApi:
    """The API server named in the settings, checked: reachable, token accepted, same preparation."""
    if not settings.api_url:
        raise ServiceError("A remote worker needs the API server's URL: --api-url or ENGINE_SERVICE_API_URL.")
    try:
        token = settings.worker_token_value()
    except ValueError as exc:
        raise ServiceError(str(exc)) from exc
    if token is None:
        raise ServiceError(
            "A remote worker needs the server's worker token in ENGINE_SERVICE_WORKER_TOKEN "
            "(the same value the API server has)."
        )
    api = WorkerApi(settings.api_url, token, retry_seconds=30.0)
    try:
        identity = api.hello()
    except BaseException:
        api.close()
        raise
    server_preparation = identity["preparation_version"]
    if server_preparation != PREPARATION_VERSION:
        api.close()
        raise ServiceError(
            f"The API server at {settings.api_url} prepares models with version {server_preparation} and "
            f"this worker with {PREPARATION_VERSION}: their engines would not be what the keys promise. "
            "Run the same engine-service release on both."
        )
    if identity["version"] != __version__:
        logger.warning(
            "the API server runs engine-service %s and this worker %s; run the same release on both",
            identity["version"],
            __version__,
        )
    api.retry_seconds = 120.0  # once running, ride out an API restart
    return api


def run_remote_worker(
    settings: Settings,
    queue: RedisJobQueue,
    targets: Sequence[JobTarget],
    *,
    burst: bool,
    grace_seconds: float,
    name: str | None,
) -> int:
    """Run builds for ``targets`` from ``queue`` for the API server in the settings; the exit code."""
    if not targets:
        logger.error("no backend can build on this host, and a remote worker runs only builds")
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per progress call drowns the log
    try:
        api = connect(settings)
    except ServiceError as exc:
        logger.error("%s", exc.message)
        return 2
    if settings.private_data:  # the cache holds other people's models and calibration data
        make_private([settings.worker_cache_dir])  # what an older worker left; run_worker set the umask
    executor = remote_executor(api, WorkerCache(settings.worker_cache_dir, settings.worker_cache_bytes))
    try:
        worker = JobWorker(executor, queue, targets, generic=False, name=name, grace_seconds=grace_seconds)
        logger.info(
            "%s builds for %s and listens on %s",
            worker.label,
            settings.api_url,
            ", ".join(worker.queue_names),
        )
        worker.run(burst=burst)
    finally:
        executor.stop(grace_seconds)
        api.close()
    return 0
