"""Real engines in a real engine cache, for serving and report tests (no server needed)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx

from service.backends.base import BuildSpec, ShapeRange
from service.backends.registry import get_backend
from service.catalog.engine_keys import BuildConfig, EngineKey
from service.catalog.engines import EngineCache, EngineRecord, NewEngine
from service.catalog.models import ModelCatalog
from service.store.blobs import BlobStore
from service.store.db import Database
from tests.model_factory import model_bytes


@dataclass
class Stores:
    """One database with the model catalog and the engine cache over it."""

    db: Database
    models: ModelCatalog
    engines: EngineCache


def open_stores(root: Path, *, engine_budget: int = 1 << 30) -> Stores:
    db = Database(root / "db.sqlite")
    models = ModelCatalog(db, BlobStore(root / "models", suffix=".onnx"))
    return Stores(db=db, models=models, engines=EngineCache(db, root / "engines", budget_bytes=engine_budget))


def build_engine(
    stores: Stores,
    model: onnx.ModelProto,
    *,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    shapes: dict[str, ShapeRange] | None = None,
    model_id: str | None = None,
) -> EngineRecord:
    """Build ``model`` with a real backend and store the engine the way the build pipeline does."""
    data = model_bytes(model)
    record, _ = stores.models.add_model(data, "model.onnx", source="upload")
    built = get_backend(backend).build(data, BuildSpec(precision=precision, shapes=shapes or {}))  # type: ignore[arg-type]
    config = BuildConfig(precision=precision, shapes=tuple(sorted((shapes or {}).items())))  # type: ignore[arg-type]
    key = EngineKey(
        model_id=model_id or record.id, config=config, calibration_set_id=None, backend=built.info
    )
    return stores.engines.store(
        NewEngine(
            key=key,
            built_model_id=record.id,
            engine_bytes=built.engine_bytes,
            file_extension=built.file_extension,
            build_seconds=built.build_seconds,
            report={},
        )
    )


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
