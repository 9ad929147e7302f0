"""Where a build reads its inputs and where it stores what it made.

On the API host, and for workers that share its database, that is the catalogs and the engine cache
(:class:`LocalBuildStorage`). A worker on another host reads and stores through the API server
instead (:class:`service.remote.storage.RemoteBuildStorage`). The build pipeline sees only
:class:`BuildStorage`, so a build is the same code wherever it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import onnx

from service.catalog.calibration_sets import CalibrationCatalog
from service.catalog.engine_keys import EngineKey
from service.catalog.engines import EngineCache, NewEngine
from service.catalog.models import ModelCatalog
from service.datasets.storage import CalibrationSet
from service.onnx_graph.inspect import TensorSpec


@dataclass(frozen=True)
class BuildOutput:
    """Everything a finished build stores: the engine, the exact ONNX it was built from, the evidence."""

    key: EngineKey
    built_model: bytes  # the serialized ONNX handed to the backend
    built_model_name: str
    engine_bytes: bytes
    file_extension: str
    build_seconds: float
    report: dict[str, Any]
    calibration_cache: bytes | None


class BuildStorage(Protocol):
    def cached_engine_id(self, key_digest: str) -> str | None:
        """The id of the engine already stored under this key, if any."""
        ...

    def load_model(self, model_id: str) -> onnx.ModelProto: ...

    def calibration_set(
        self, set_id: str, model_inputs: Sequence[TensorSpec]
    ) -> tuple[CalibrationSet, dict[str, str]]:
        """The opened set and its binding to ``model_inputs`` (input name -> stored array)."""
        ...

    def store(self, output: BuildOutput) -> str:
        """Store the built model and the engine; returns the engine id."""
        ...


class LocalBuildStorage:
    """Builds on the API host: the service's own catalogs and engine cache."""

    def __init__(
        self, models: ModelCatalog, calibration_sets: CalibrationCatalog, cache: EngineCache
    ) -> None:
        self.models = models
        self.calibration_sets = calibration_sets
        self.cache = cache

    def cached_engine_id(self, key_digest: str) -> str | None:
        cached = self.cache.lookup(key_digest)
        return cached.id if cached is not None else None

    def load_model(self, model_id: str) -> onnx.ModelProto:
        return self.models.load(model_id)

    def calibration_set(
        self, set_id: str, model_inputs: Sequence[TensorSpec]
    ) -> tuple[CalibrationSet, dict[str, str]]:
        return self.calibration_sets.open(set_id), self.calibration_sets.bind(set_id, model_inputs)

    def store(self, output: BuildOutput) -> str:
        built_model, _ = self.models.add_model(
            output.built_model, output.built_model_name, source="build", parent_id=output.key.model_id
        )
        record = self.cache.store(
            NewEngine(
                key=output.key,
                built_model_id=built_model.id,
                engine_bytes=output.engine_bytes,
                file_extension=output.file_extension,
                build_seconds=output.build_seconds,
                report=output.report,
                calibration_cache=output.calibration_cache,
            )
        )
        # An engine dropped meanwhile may have taken this same derived model along (it was then
        # unused); adding it again after the engine row exists keeps the row's model present.
        self.models.add_model(
            output.built_model, output.built_model_name, source="build", parent_id=output.key.model_id
        )
        return record.id
