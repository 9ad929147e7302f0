"""A quantization job's params: the typed contract between the request, the job row and the job.

The stored form (:meth:`QuantizationJobParams.to_json`) is the one rows have always held: every field
by name, ``skip`` as a list, ``task`` and ``accuracy_targets`` as their JSON. Rows written before a
field existed lack it and read back with its default, so a job queued before an upgrade runs after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pydantic import TypeAdapter, ValidationError

from service.accuracy.tasks import AccuracyTarget, TaskSpec
from service.catalog.engine_keys import CalibrationMethodName
from service.errors import InvalidJobParams
from service.quantize.pipeline import SensitivityMode
from service.quantize.placement import PlacementTarget


@dataclass(frozen=True)
class QuantizationJobParams:
    """What a quantization job calibrates and how (the fields of ``POST /v1/quantizations``, with the
    ids resolved to full ones and ``accuracy_target`` as a tuple)."""

    model_id: str
    calibration_set_id: str
    eval_set_id: str | None = None
    method: CalibrationMethodName = "auto"
    percentile: float = 99.99
    skip: tuple[str, ...] = ()
    sensitivity: SensitivityMode = "off"
    min_snr_db: float | None = None
    min_cosine: float | None = None
    holdout_fraction: float = 0.2
    holdout_seed: int = 0
    max_samples: int | None = None
    target: PlacementTarget = "tensorrt"
    task: TaskSpec | None = None  # None: the model's named task, else guessed
    accuracy_targets: tuple[AccuracyTarget, ...] = ()  # empty: the task's defaults

    def to_json(self) -> dict[str, Any]:
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        data["skip"] = list(self.skip)
        data["task"] = self.task.model_dump() if self.task is not None else None
        data["accuracy_targets"] = [target.model_dump() for target in self.accuracy_targets]
        return data

    @classmethod
    def from_json(cls, data: object) -> QuantizationJobParams:
        """Read the stored form (InvalidJobParams when it is not one)."""
        if not isinstance(data, Mapping):
            raise InvalidJobParams(
                f"A quantization job's params are not an object but {type(data).__name__}."
            )
        unknown = sorted(set(data) - {field.name for field in fields(cls)})
        if unknown:
            raise InvalidJobParams(f"A quantization job's params hold unknown fields {unknown}.")
        try:
            return _ADAPTER.validate_python(dict(data))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}" for error in exc.errors()
            )
            raise InvalidJobParams(f"A quantization job's params are not readable: {problems}.") from exc


_ADAPTER = TypeAdapter(QuantizationJobParams)
