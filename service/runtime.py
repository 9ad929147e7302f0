"""The long-lived parts of a running service, built once at start-up and closed at shutdown.

``Services`` is what the API layer reaches through its dependencies; capability packages receive the
pieces they need as arguments and never look them up globally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from service.catalog.models import ModelCatalog
from service.config import Settings
from service.jobs.records import JobStore
from service.jobs.runner import JobRunner
from service.store.blobs import BlobStore
from service.store.db import Database

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    db: Database
    model_blobs: BlobStore
    jobs: JobStore
    runner: JobRunner
    models: ModelCatalog
    # Capabilities registered by later layers (calibration sets, engines, runners, metrics...).
    extras: dict[str, Any] = field(default_factory=dict)

    def close(self, grace_seconds: float = 30.0) -> None:
        self.runner.stop(grace_seconds)
        for extra in self.extras.values():
            close = getattr(extra, "close", None)
            if callable(close):
                close()
        self.db.close()


def open_services(settings: Settings) -> Services:
    """Open storage, reconcile it with what a previous process left, and start the job runner."""
    settings.ensure_dirs()
    db = Database(settings.database_path)
    model_blobs = BlobStore(settings.models_dir, suffix=".onnx")
    jobs = JobStore(db)
    runner = JobRunner(
        jobs,
        workers=settings.job_workers,
        max_active_per_owner=settings.max_concurrent_jobs_per_key if settings.auth_enabled else None,
    )
    services = Services(
        settings=settings,
        db=db,
        model_blobs=model_blobs,
        jobs=jobs,
        runner=runner,
        models=ModelCatalog(db, model_blobs),
    )
    return services
