"""The evidence a build leaves with its engine: a typed value in the code, a JSON object at rest.

The build pipeline (:mod:`service.builds.pipeline`) produces a :class:`BuildReport`; the engine cache
stores its :meth:`~BuildReport.to_dict` in the engine's row, and readers (the engine routes, the report
jobs, the worker upload check, precision "auto") read it back with :meth:`BuildReport.from_dict`
instead of picking keys out of the dict. The nested parts (layers, fusions, accuracy, quantization,
speed) are the ``to_dict()`` of their own typed values and stay JSON objects here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _optional_mapping(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(item) for item in value) if isinstance(value, list | tuple) else ()


@dataclass(frozen=True)
class BuildReport:
    """What a build found out, in the order a person decides on it (task metric, verdict, warnings)."""

    task: dict[str, Any] | None = None  # the accuracy check's task metric, when there was one
    target_met: bool | None = None  # None: no accuracy target applied or nothing was measured
    int8_share: float | None = None  # share of quantizable layers left in INT8 by the search
    warnings: tuple[str, ...] = ()
    backend: dict[str, Any] = dataclasses.field(default_factory=dict)  # name, version, device, capability
    preparation: tuple[str, ...] = ()  # steps from the uploaded model to the one built
    kept_layers: tuple[str, ...] = ()  # ONNX nodes kept out of INT8
    layer_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    layers: dict[str, Any] = dataclasses.field(default_factory=dict)  # the backend's layer report
    fusions: dict[str, Any] = dataclasses.field(default_factory=dict)  # static patterns vs engine layers
    accuracy: dict[str, Any] | None = None  # FP32 vs the built Q/DQ model on held-out samples
    quantization: dict[str, Any] | None = None  # the calibration and placement summary
    build_log_tail: tuple[str, ...] = ()
    speed: dict[str, Any] | None = None  # INT8 vs FP32 on this host, when it could run here

    def with_speed(self, speed: Mapping[str, Any], warning: str | None = None) -> BuildReport:
        """This report with the speed check's figures and, if it gave one, its warning."""
        warnings = (*self.warnings, warning) if warning else self.warnings
        return dataclasses.replace(self, speed=dict(speed), warnings=warnings)

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON object; ``speed`` only when a speed check ran (as builds always stored it)."""
        body: dict[str, Any] = {
            "task": self.task,
            "target_met": self.target_met,
            "int8_share": self.int8_share,
            "warnings": list(self.warnings),
            "backend": dict(self.backend),
            "preparation": list(self.preparation),
            "kept_layers": list(self.kept_layers),
            "layer_counts": dict(self.layer_counts),
            "layers": dict(self.layers),
            "fusions": dict(self.fusions),
            "accuracy": self.accuracy,
            "quantization": self.quantization,
            "build_log_tail": list(self.build_log_tail),
        }
        if self.speed is not None:
            body["speed"] = self.speed
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildReport:
        """A stored report, read leniently: rows of older versions or uploads may lack any part."""
        int8_share = data.get("int8_share")
        target_met = data.get("target_met")
        return cls(
            task=_optional_mapping(data.get("task")),
            target_met=target_met if isinstance(target_met, bool) else None,
            int8_share=float(int8_share) if isinstance(int8_share, int | float) else None,
            warnings=_strings(data.get("warnings")),
            backend=_mapping(data.get("backend")),
            preparation=_strings(data.get("preparation")),
            kept_layers=_strings(data.get("kept_layers")),
            layer_counts={str(k): int(v) for k, v in _mapping(data.get("layer_counts")).items()},
            layers=_mapping(data.get("layers")),
            fusions=_mapping(data.get("fusions")),
            accuracy=_optional_mapping(data.get("accuracy")),
            quantization=_optional_mapping(data.get("quantization")),
            build_log_tail=_strings(data.get("build_log_tail")),
            speed=_optional_mapping(data.get("speed")),
        )
