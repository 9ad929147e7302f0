"""Response schemas of the engine and calibration-set routes: exactly the JSON those routes return.

The nested parts (a build config, a layer report, fusion patterns, per-input statistics) are the
``to_dict()`` of their domain values and stay JSON objects here. Routes whose stored documents may
lack parts (engines built before a part existed) answer with ``response_model_exclude_unset`` so that
an absent part stays absent rather than appearing as null.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class EnginePublic(BaseModel):
    """One cached engine, as listed: what a user decides on first, then identity and evidence."""

    id: str
    task: dict[str, Any] | None
    target_met: bool | None
    int8_share: float | None
    warnings: list[str]
    speed: dict[str, Any] | None
    model_id: str
    built_model_id: str
    calibration_set_id: str | None
    backend: str
    backend_version: str
    device: str
    precision: str
    build_config: dict[str, Any]
    build_seconds: float
    engine_bytes: int
    plan_sha256: str
    layer_counts: dict[str, int]
    fusion_summary: dict[str, Any] | None
    accuracy: dict[str, Any] | None
    has_calibration_cache: bool
    created_at: str
    last_used_at: str


class EngineDetail(EnginePublic):
    """One engine with how its model was prepared (steps, layers kept out of INT8, quantization)."""

    preparation: list[str]
    kept_layers: list[str]
    quantization: dict[str, Any] | None


class EngineLayersPublic(BaseModel):
    """The engine's layers as its backend reported them (absent for engines stored without them)."""

    engine_id: str
    source: str | None = None
    layers: list[dict[str, Any]] | None = None


class EngineFusionsPublic(BaseModel):
    """Static fusion patterns checked against the engine's layers, and their summary."""

    engine_id: str
    backend: str
    device: str
    source: str | None = None
    patterns: list[dict[str, Any]] | None = None
    summary: dict[str, Any] | None = None


class CalibrationSetPublic(BaseModel):
    """A stored calibration set: format, samples, per-input shape, dtype and statistics."""

    id: str
    name: str
    size_bytes: int
    created_at: str
    format: str
    samples: int
    inputs: list[dict[str, Any]]
    source_filename: str | None
    preprocess: dict[str, Any] | None
    skipped: list[dict[str, Any]]
    skipped_count: int


class CalibrationSetValidation(BaseModel):
    """A set fits a model: which stored array feeds each model input."""

    calibration_set_id: str
    model_id: str
    valid: bool
    binding: dict[str, str]
