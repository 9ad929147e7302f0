"""The long-lived parts of a running service, built once at start-up and closed at shutdown.

This is the composition root: :func:`open_services` is the one place that builds every long-lived part
and wires them together (job kinds, listeners, the runner pool). ``Services`` is what the API layer and
the worker command reach; capability packages receive the pieces they need as arguments and never look
them up globally, nor import this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from service.auth.keys import KeyRing, KeyStore
from service.builds.pipeline import BuildPipeline
from service.builds.quantization_job import QUANTIZATION_JOB, QuantizationJob
from service.builds.storage import LocalBuildStorage
from service.builds.submit import BUILD_JOB
from service.catalog.calibration_sets import CalibrationCatalog
from service.catalog.engines import EngineCache
from service.catalog.models import ModelCatalog
from service.config import Settings
from service.datasets.preprocess import PreprocessLimits
from service.datasets.zip_stream import ExpansionLimits
from service.jobs.host_gate import HostGate
from service.jobs.leases import LeaseSweeper
from service.jobs.records import JobStore
from service.jobs.runner import JobQueue, JobRunner
from service.observability.metrics import ServiceMetrics
from service.onnx_graph.graph_limits import GraphLimits
from service.reports.benchmark import BENCHMARK_KIND
from service.reports.comparison import COMPARISON_KIND
from service.reports.evaluation import EVALUATION_KIND
from service.reports.jobs import ReportJobs
from service.reports.synthetic_inputs import TensorBudget
from service.serving.runner_pool import RunnerPool
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.file_modes import make_private
from service.store.owners import Ownership

logger = logging.getLogger(__name__)

# The host gate's lock files, under the engines root (a volume the processes of one host share).
HOST_GATE_DIR = ".host"


@dataclass
class Services:
    settings: Settings
    db: Database
    model_blobs: BlobStore
    jobs: JobStore
    runner: JobRunner
    models: ModelCatalog
    calibration_sets: CalibrationCatalog
    calibration_uploads: BlobStore  # staging area for calibration uploads before ingest
    engines: EngineCache
    keys: KeyRing  # API keys accepted by this server
    metrics: ServiceMetrics  # this app's Prometheus registry
    runner_pool: RunnerPool  # warm runners shared by inference and the report jobs
    report_jobs: ReportJobs  # submission checks and handlers of benchmarks, evaluations, comparisons
    # Fails jobs of remote workers that stopped reporting (only when remote workers are enabled).
    lease_sweeper: LeaseSweeper | None = None

    @property
    def owners(self) -> Ownership:
        """Who owns which model, set, engine and job (service.store.owners)."""
        return Ownership(self.db)

    def start(self) -> None:
        """Start the background work of a serving process: the job runner and the lease sweeper."""
        self.runner.start()
        if self.lease_sweeper is not None:
            self.lease_sweeper.start()

    def close(self, grace_seconds: float = 30.0) -> None:
        if self.lease_sweeper is not None:
            self.lease_sweeper.close()
        self.runner.stop(grace_seconds)
        self.runner_pool.close()
        self.db.close()


def open_services(settings: Settings) -> Services:
    """Open storage, reconcile it with what a previous process left, and register the job kinds.

    The serving process starts the background work with :meth:`Services.start` once everything is
    registered (the app's lifespan does).
    """
    settings.worker_token_value()  # a token too short to be safe stops start-up, before anything opens
    settings.ensure_dirs()
    db = Database(settings.database_path)
    # The server and worker processes also set umask 077 where they start (service.cli.main); here,
    # also for in-process users such as `engine-service local`, the roots become 0700 (nothing under
    # them is reachable by another user) and the database 0600 (its WAL and SHM files take its mode).
    if settings.private_data:
        tightened = make_private(
            (settings.engines_dir, settings.calibration_dir, settings.models_dir), settings.database_path
        )
        if tightened:
            logger.warning("made %d existing data file(s) and folder(s) private (0600/0700)", tightened)
    model_blobs = BlobStore(settings.models_dir, suffix=".onnx")
    jobs = JobStore(db)
    # Seed the bootstrap key and read the keys file only when auth is on; a bad one stops start-up.
    bootstrap = settings.bootstrap_api_key
    keys = (
        KeyRing.open(
            db,
            bootstrap_token=bootstrap.get_secret_value() if bootstrap is not None else None,
            key_file=settings.api_keys_file,
        )
        if settings.auth_enabled
        else KeyRing(KeyStore(db))
    )
    queue: JobQueue | None = None  # None: the embedded runner's in-process queue
    if settings.queue_backend == "redis":
        from service.jobs.redis_queue import RedisJobQueue  # imported only when used

        queue = RedisJobQueue.connect(settings.redis_url)
    runner = JobRunner(
        jobs,
        workers=settings.job_workers,
        # One rule in both modes: queued or running jobs per owner (each key, or the local owner).
        max_active_per_owner=(
            settings.max_concurrent_jobs_per_key
            if settings.auth_enabled
            else settings.max_queued_jobs_per_owner
        ),
        owner_limit=keys.job_limit,  # a key's own concurrent-job limit
        limit_setting=(
            "ENGINE_SERVICE_MAX_CONCURRENT_JOBS_PER_KEY"
            if settings.auth_enabled
            else "ENGINE_SERVICE_MAX_QUEUED_JOBS_PER_OWNER"
        ),
        queue=queue,
        # Latency jobs run alone among the jobs of every process sharing this engines directory.
        gate=HostGate(settings.engines_dir / HOST_GATE_DIR),
    )
    # Job counts at scrape time, build durations from finished jobs.
    metrics = ServiceMetrics()
    metrics.track_jobs(jobs)
    runner.add_listener(metrics.observe_job)
    models = ModelCatalog(
        db,
        model_blobs,
        upload_limits=GraphLimits(
            max_nodes=settings.max_model_nodes, max_graph_bytes=settings.max_model_graph_bytes
        ),
    )
    calibration_sets = CalibrationCatalog(
        db,
        settings.calibration_dir,
        max_archive_members=settings.max_archive_members,
        max_archive_uncompressed_bytes=settings.max_archive_uncompressed_bytes,
        member_limits=ExpansionLimits(
            member_bytes=settings.max_archive_member_bytes, ratio=settings.max_archive_expansion_ratio
        ),
        preprocess_limits=PreprocessLimits(
            sample_bytes=settings.max_preprocessed_sample_bytes, set_bytes=settings.max_preprocessed_bytes
        ),
    )
    # An engine leaving the cache takes the model derived for its build along (when no other uses it).
    engines = EngineCache(
        db, settings.engines_dir, budget_bytes=settings.engine_cache_bytes, derived_models=models
    )
    # With a shared queue, other processes may be storing something right now: only reconcile
    # files old enough that no live request can still be about to insert their row. Files without
    # a row are registered again or quarantined, never deleted (see service/store/quarantine.py).
    orphan_age = 3600.0 if settings.queue_backend == "redis" else 0.0
    for what, reconciled in (
        ("engine cache", engines.reconcile(min_orphan_age_s=orphan_age)),
        ("calibration sets", calibration_sets.reconcile(min_orphan_age_s=orphan_age)),
        ("models", models.reconcile(min_orphan_age_s=orphan_age)),
    ):
        if any(reconciled.values()):
            logger.warning("%s reconciled with the files on disk: %s", what, reconciled)
    # Recovered rows lost their owner with their row: the local owner holds them (admin keys see them;
    # `engine-service keys adopt-local` hands them to a key).
    Ownership(db).adopt_recovered()
    runner_pool = RunnerPool(engines, budget_bytes=settings.runner_cache_bytes)
    engines.add_drop_listener(runner_pool.discard)  # a deleted or evicted engine is never served warm
    metrics.set_loaded_runners_source(lambda: float(len(runner_pool.stats().runners)))
    report_jobs = ReportJobs(
        engines=engines,
        models=models,
        calibration_sets=calibration_sets,
        jobs=jobs,
        runner=runner,
        pool=runner_pool,
        budget=TensorBudget(
            one_input=settings.max_input_tensor_bytes, all_inputs=settings.max_benchmark_input_bytes
        ),
    )
    services = Services(
        settings=settings,
        db=db,
        model_blobs=model_blobs,
        jobs=jobs,
        runner=runner,
        models=models,
        calibration_sets=calibration_sets,
        calibration_uploads=BlobStore(settings.calibration_dir / ".incoming"),
        engines=engines,
        keys=keys,
        metrics=metrics,
        runner_pool=runner_pool,
        report_jobs=report_jobs,
    )
    metrics.set_cache_bytes_source(engines.total_bytes)
    # An engine that leaves the cache (delete, eviction, damage) leaves every key's list with it.
    engines.add_drop_listener(partial(Ownership(db).forget, "engine"))
    runner.register(BUILD_JOB, BuildPipeline(LocalBuildStorage(models, calibration_sets, engines)).handle)
    if settings.worker_token is not None:  # remote workers may hold jobs: bound how long a lost one does
        services.lease_sweeper = LeaseSweeper(
            jobs,
            lease_s=settings.remote_job_lease_s,
            interval_s=settings.remote_lease_sweep_s,
            on_failed=runner.notify_finished,
        )
    runner.register(QUANTIZATION_JOB, QuantizationJob(models, calibration_sets, engines.artifacts).handle)
    # Latency is measured alone on the host (HostGate): other jobs would be measured along with the engine.
    runner.register(BENCHMARK_KIND, report_jobs.benchmark, exclusive=True)
    runner.register(EVALUATION_KIND, report_jobs.evaluation)
    runner.register(COMPARISON_KIND, report_jobs.comparison, exclusive=True)
    return services
