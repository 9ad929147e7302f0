"""Real stores for build tests: SQLite catalogs, the engine cache and a job runner that is not started
(jobs are run in the test with ``execute``), with the build job registered and one model uploaded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.builds.pipeline import BuildPipeline
from service.builds.requests import BuildRequest
from service.builds.storage import LocalBuildStorage
from service.builds.submit import BUILD_JOB, BuildSubmission, submit_build
from service.catalog.calibration_sets import CalibrationCatalog
from service.catalog.engines import EngineCache
from service.catalog.models import ModelCatalog, ModelRecord
from service.jobs.records import JobStore
from service.jobs.runner import JobRunner
from service.store.blobs import BlobStore
from service.store.db import Database
from tests.model_factory import model_bytes, resnet_block_classifier


@dataclass
class Stores:
    models: ModelCatalog
    calibration_sets: CalibrationCatalog
    engines: EngineCache
    jobs: JobStore
    runner: JobRunner
    model: ModelRecord

    def submit(self, request: BuildRequest) -> BuildSubmission:
        return submit_build(
            request,
            models=self.models,
            calibration_sets=self.calibration_sets,
            engines=self.engines,
            runner=self.runner,
        )


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    db = Database(tmp_path / "db.sqlite")
    models = ModelCatalog(db, BlobStore(tmp_path / "models", suffix=".onnx"))
    calibration_sets = CalibrationCatalog(
        db, tmp_path / "calibration", max_archive_members=1000, max_archive_uncompressed_bytes=10**9
    )
    engines = EngineCache(db, tmp_path / "engines", budget_bytes=10**9)
    jobs = JobStore(db)
    runner = JobRunner(jobs)
    runner.register(BUILD_JOB, BuildPipeline(LocalBuildStorage(models, calibration_sets, engines)).handle)
    model, _ = models.add_model(model_bytes(resnet_block_classifier(seed=3)), "block.onnx", source="upload")
    yield Stores(models, calibration_sets, engines, jobs, runner, model)
    db.close()
