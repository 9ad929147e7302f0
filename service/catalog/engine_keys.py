"""Build requests in canonical form, and the engine cache key derived from them.

Two requests that would produce the same engine must map to the same key, and two that could
differ must not: the key hashes the model bytes' digest, the canonical build config (sorted,
defaults filled in), the calibration set id, and the backend's name, version and device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from service.backends.base import BackendInfo, Precision, ShapeRange

CalibrationMethodName = Literal["entropy", "max", "percentile", "mse", "auto"]

# Bumped whenever the service changes what it hands a builder for the same request (Q/DQ placement,
# FP16 typing, BN folding...), so engines prepared the old way are rebuilt instead of served.
PREPARATION_VERSION = 4  # 4: TensorRT placement keeps layers reading mixed-range joins float; FP16 Casts


@dataclass(frozen=True)
class CalibrationOptions:
    method: CalibrationMethodName = "auto"  # auto: the accuracy search (quantize/search.py)
    percentile: float = 99.99
    max_samples: int | None = None  # cap on calibration samples used (None: all)
    holdout_fraction: float = 0.2  # share of the set held out for the accuracy check
    holdout_seed: int = 0  # the held-out samples are drawn at random with this seed
    task: dict[str, Any] | None = None  # TaskSpec as JSON; None: guessed from the outputs
    accuracy_targets: tuple[dict[str, Any], ...] = ()  # AccuracyTarget as JSON; empty: task defaults

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy_targets"] = list(self.accuracy_targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationOptions:
        values = dict(data)
        values["accuracy_targets"] = tuple(values.get("accuracy_targets", ()))
        return cls(**values)


@dataclass(frozen=True)
class BuildConfig:
    """Everything about a build except the model, calibration set and backend identity.

    ``eval_set_id`` is the held-out set of an INT8 build the service calibrates (None otherwise): it can
    change the engine (method "auto" and sensitivity choose by accuracy on it), so it is part of the key.
    In the canonical form it sits under ``"extra"`` as it always did, so no existing digest changes.
    """

    precision: Precision
    keep: tuple[str, ...] = ()
    shapes: tuple[tuple[str, ShapeRange], ...] = ()
    calibration: CalibrationOptions | None = None
    workspace_bytes: int | None = None
    eval_set_id: str | None = None

    def shape_map(self) -> dict[str, ShapeRange]:
        return dict(self.shapes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "keep": sorted(self.keep),
            "shapes": {
                name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
                for name, r in sorted(self.shapes)
            },
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "workspace_bytes": self.workspace_bytes,
            # The name "extra" is kept from the first key format: renaming it would change every digest.
            "extra": {"eval_set_id": self.eval_set_id} if self.eval_set_id is not None else {},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        """The config whose :meth:`to_dict` is ``data``; ValueError for an ``"extra"`` entry it does not
        know (dropping one silently would change the key's digest)."""
        extra = dict(data.get("extra") or {})
        eval_set_id = extra.pop("eval_set_id", None)
        if extra:
            raise ValueError(f"unknown build config entries {sorted(extra)}: only 'eval_set_id' is known")
        shapes = tuple(
            (name, ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"])))
            for name, r in sorted(data.get("shapes", {}).items())
        )
        calibration = data.get("calibration")
        return cls(
            precision=data["precision"],
            keep=tuple(sorted(data.get("keep", ()))),
            shapes=shapes,
            calibration=CalibrationOptions.from_dict(calibration) if calibration else None,
            workspace_bytes=data.get("workspace_bytes"),
            eval_set_id=eval_set_id,
        )


@dataclass(frozen=True)
class EngineKey:
    """The identity of an engine in the cache."""

    model_id: str
    config: BuildConfig
    calibration_set_id: str | None
    backend: BackendInfo

    def canonical(self) -> dict[str, Any]:
        return {
            "preparation_version": PREPARATION_VERSION,
            "model_sha256": self.model_id,
            "build_config": self.config.to_dict(),
            "calibration_set_id": self.calibration_set_id,
            "backend": self.backend.name,
            "backend_version": self.backend.version,
            "device": self.backend.device,
            "compute_capability": self.backend.compute_capability,
        }

    @classmethod
    def from_canonical(cls, canonical: dict[str, Any]) -> EngineKey:
        """The key whose :meth:`canonical` form is ``canonical`` (so its digest is the same)."""
        backend = BackendInfo(
            name=canonical["backend"],
            version=canonical["backend_version"],
            device=canonical["device"],
            compute_capability=canonical.get("compute_capability"),
        )
        return cls(
            model_id=canonical["model_sha256"],
            config=BuildConfig.from_dict(canonical["build_config"]),
            calibration_set_id=canonical.get("calibration_set_id"),
            backend=backend,
        )

    @property
    def digest(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()
