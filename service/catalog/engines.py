"""The engine cache: engines stored by key, verified on every read, evicted least-recently-used.

An engine is stored in two steps in this order: the plan bytes (atomic blob write), then the row.
A crash between them leaves a file without a row, which :meth:`EngineCache.reconcile` quarantines
at start-up; a row never points at a half-written file. Reads hash the file and compare with the
recorded digest, so a damaged or truncated plan is dropped from the cache rather than served.
"""

from __future__ import annotations

import builtins
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from service.catalog.build_report import BuildReport
from service.catalog.engine_keys import BuildConfig, EngineKey
from service.errors import NotFound
from service.onnx_graph.initializer_inputs import without_initializer_inputs
from service.store.blobs import BlobStore
from service.store.clock import utc_now
from service.store.db import Database
from service.store.ids import resolve_id
from service.store.quarantine import quarantine

logger = logging.getLogger(__name__)


class CorruptEngine(NotFound):
    """The stored plan no longer matches its digest; it was removed and must be rebuilt."""

    code = "engine_corrupt"


@dataclass(frozen=True)
class EngineRecord:
    id: str
    model_id: str
    built_model_id: str
    calibration_set_id: str | None
    backend: str
    backend_version: str
    device: str
    precision: str
    build_config: BuildConfig
    plan_sha256: str
    size_bytes: int
    file_extension: str
    build_seconds: float
    report: dict[str, Any]  # a BuildReport's to_dict(), as stored
    calibration_cache_sha256: str | None
    created_at: str
    last_used_at: str

    def to_dict(self) -> dict[str, Any]:
        report = BuildReport.from_dict(self.report)
        return {
            "id": self.id,
            # What a user decides on leads: the task metric, the verdict, the warnings, the speed.
            "task": report.task,
            "target_met": report.target_met,
            "int8_share": report.int8_share,
            "warnings": list(report.warnings),
            "speed": report.speed,
            "model_id": self.model_id,
            "built_model_id": self.built_model_id,
            "calibration_set_id": self.calibration_set_id,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "device": self.device,
            "precision": self.precision,
            "build_config": self.build_config.to_dict(),
            "build_seconds": self.build_seconds,
            "engine_bytes": self.size_bytes,
            "plan_sha256": self.plan_sha256,
            "layer_counts": report.layer_counts,
            "fusion_summary": report.fusions.get("summary"),
            "accuracy": report.accuracy,
            "has_calibration_cache": self.calibration_cache_sha256 is not None,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


def _record(row: Any) -> EngineRecord:
    return EngineRecord(
        id=row["id"],
        model_id=row["model_id"],
        built_model_id=row["built_model_id"],
        calibration_set_id=row["calibration_set_id"],
        backend=row["backend"],
        backend_version=row["backend_version"],
        device=row["device"],
        precision=row["precision"],
        build_config=BuildConfig.from_dict(json.loads(row["build_config_json"])),
        plan_sha256=row["plan_sha256"],
        size_bytes=int(row["size_bytes"]),
        file_extension=row["file_extension"],
        build_seconds=float(row["build_seconds"]),
        report=json.loads(row["report_json"]),
        calibration_cache_sha256=row["calibration_cache_sha256"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
    )


@dataclass(frozen=True)
class NewEngine:
    """What a finished build hands to the cache."""

    key: EngineKey
    built_model_id: str
    engine_bytes: bytes
    file_extension: str
    build_seconds: float
    report: dict[str, Any]
    calibration_cache: bytes | None = None


# How stale an engine's recorded last use may get while it is served warm (see note_use).
TOUCH_INTERVAL_S = 10.0
# Why an engine left the cache; recorded on the build jobs that produced it.
DropReason = Literal["evicted", "deleted", "damaged"]
_DROP_MESSAGES: dict[str, str] = {
    "evicted": "evicted to keep the engine cache within ENGINE_SERVICE_ENGINE_CACHE_BYTES",
    "deleted": "deleted with DELETE /v1/engines/{id}",
    "damaged": "removed because its plan file was missing or damaged on disk",
}


class DerivedModels(Protocol):
    """Where the models builds derive live (the model catalog); lets a dropped engine take its own."""

    def discard_derived(self, model_id: str) -> bool: ...


def engine_removed_note(reason: str, at: str) -> dict[str, str]:
    """What a build job's result records when its engine leaves the cache."""
    return {
        "reason": reason,
        "at": at,
        "message": f"The engine was {_DROP_MESSAGES.get(reason, reason)}; send the same build request "
        "again (POST /v1/builds) to rebuild it.",
    }


class EngineCache:
    """Engines by key. Dropping one (eviction, delete, damage) removes everything that was its alone:
    the plan, its runtime cache, its calibration cache and the model derived for its build."""

    def __init__(
        self, db: Database, root: Path, *, budget_bytes: int, derived_models: DerivedModels | None = None
    ) -> None:
        self.db = db
        self.derived_models = derived_models
        self.plans = BlobStore(root / "plans")
        self.artifacts = BlobStore(root / "artifacts")  # calibration caches and other build outputs
        # TensorRT-RTX runtime caches (kernels compiled when an engine first runs), one per engine.
        self.runtime_caches = root / "runtime_caches"
        self.budget_bytes = budget_bytes
        self._drop_listeners: builtins.list[Callable[[str], object]] = []
        self._touched: dict[str, float] = {}  # engine id -> monotonic time of its last recorded use

    def add_drop_listener(self, listener: Callable[[str], object]) -> None:
        """Called with the id of every engine leaving the cache (delete, eviction, damage)."""
        self._drop_listeners.append(listener)

    def lookup(self, key_digest: str) -> EngineRecord | None:
        """The cached engine for a key, or None; a missing or resized file is dropped as a miss.

        Lookups sit on the request path (cache-hit latency), so they check the file's presence and
        size only; the full sha256 check runs whenever the plan is read, downloaded or loaded.
        """
        row = self.db.query_one("SELECT * FROM engines WHERE id = ?", (key_digest,))
        if row is None:
            return None
        record = _record(row)
        path = self.plans.path_for(record.plan_sha256)
        if not path.is_file() or path.stat().st_size != record.size_bytes:
            logger.warning("engine %s failed verification; dropping it from the cache", record.id)
            self._drop(record)
            return None
        self.touch(record.id)
        return record

    def store(self, new: NewEngine) -> EngineRecord:
        """Store a built engine. An ONNX engine (ONNX Runtime's) is stored with its real inputs only:
        models before IR 4 list every weight as an input too, which a runner would then demand."""
        engine_bytes = new.engine_bytes
        if new.file_extension == ".onnx":
            engine_bytes = without_initializer_inputs(engine_bytes)
        plan = self.plans.put_bytes(engine_bytes)
        cache_sha = self.artifacts.put_bytes(new.calibration_cache).sha256 if new.calibration_cache else None
        now = utc_now()
        key = new.key
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO engines (id, model_id, built_model_id, calibration_set_id, "
                "backend, backend_version, device, precision, build_config_json, plan_sha256, size_bytes, "
                "file_extension, build_seconds, report_json, calibration_cache_sha256, created_at, "
                "last_used_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key.digest,
                    key.model_id,
                    new.built_model_id,
                    key.calibration_set_id,
                    key.backend.name,
                    key.backend.version,
                    key.backend.device,
                    key.config.precision,
                    json.dumps(key.config.to_dict()),
                    plan.sha256,
                    plan.size_bytes,
                    new.file_extension,
                    new.build_seconds,
                    json.dumps(new.report),
                    cache_sha,
                    now,
                    now,
                ),
            )
        self.evict(keep=key.digest)
        return self.get(key.digest)

    def get(self, engine_id: str) -> EngineRecord:
        """The engine ``engine_id`` names exactly or by a unique prefix (Conflict when ambiguous)."""
        full_id = resolve_id(self.db, "engines", engine_id, noun="engine")
        row = None if full_id is None else self.db.query_one("SELECT * FROM engines WHERE id = ?", (full_id,))
        if row is None:
            raise NotFound(f"No engine with id '{engine_id}'. List engines with GET /v1/engines.")
        return _record(row)

    def exists(self, engine_id: str) -> bool:
        """Whether an engine with exactly this id is stored."""
        return self.db.query_one("SELECT 1 FROM engines WHERE id = ?", (engine_id,)) is not None

    def list(self, *, model_id: str | None = None) -> builtins.list[EngineRecord]:
        if model_id is None:
            rows = self.db.query("SELECT * FROM engines ORDER BY created_at DESC")
        else:
            rows = self.db.query(
                "SELECT * FROM engines WHERE model_id = ? ORDER BY created_at DESC", (model_id,)
            )
        return [_record(r) for r in rows]

    def verified_plan_path(self, engine_id: str) -> Path:
        """The plan file, after checking it still matches its digest."""
        record = self.get(engine_id)
        if not self.plans.verify(record.plan_sha256):
            self._drop(record)
            raise CorruptEngine(
                f"Engine {engine_id}'s plan file was damaged on disk and has been removed; build it again."
            )
        self.touch(record.id)
        return self.plans.path_for(record.plan_sha256)

    def read_plan(self, engine_id: str) -> bytes:
        record = self.get(engine_id)
        try:
            data = self.plans.read_bytes(record.plan_sha256, verify=True)
        except Exception as exc:  # missing or damaged: never serve it
            self._drop(record)
            raise CorruptEngine(
                f"Engine {engine_id}'s plan file is missing or damaged and has been removed; build it again."
            ) from exc
        self.touch(record.id)
        return data

    def calibration_cache_path(self, engine_id: str) -> Path:
        record = self.get(engine_id)
        if record.calibration_cache_sha256 is None:
            raise NotFound(
                f"Engine {engine_id} was not calibrated by the service; it has no calibration cache."
            )
        return self.artifacts.path_for(record.calibration_cache_sha256)

    def touch(self, engine_id: str) -> None:
        self.db.execute("UPDATE engines SET last_used_at = ? WHERE id = ?", (utc_now(), engine_id))
        self._touched[engine_id] = time.monotonic()

    def note_use(self, engine_id: str) -> None:
        """Mark the engine used now, writing at most once per TOUCH_INTERVAL_S per engine.

        Warm runners serve requests without reading the plan, so without this an engine served all
        day would look unused and be the first evicted; with synchronous commits a write per
        request would cost an fsync each, so the recorded time may lag by up to the interval.
        """
        last = self._touched.get(engine_id)
        if last is None or time.monotonic() - last >= TOUCH_INTERVAL_S:
            self.touch(engine_id)

    def total_bytes(self) -> int:
        row = self.db.query_one("SELECT COALESCE(SUM(size_bytes), 0) FROM engines")
        return int(row[0]) if row else 0

    def evict(self, *, keep: str | None = None) -> builtins.list[str]:
        """Drop least-recently-used engines until the cache fits its budget; returns evicted ids."""
        evicted: builtins.list[str] = []
        total = self.total_bytes()
        if total <= self.budget_bytes:
            return evicted
        for row in self.db.query("SELECT * FROM engines ORDER BY last_used_at ASC"):
            if total <= self.budget_bytes:
                break
            if row["id"] == keep:
                continue
            record = _record(row)
            self._drop(record, reason="evicted")
            total -= record.size_bytes
            evicted.append(record.id)
        return evicted

    def delete(self, engine_id: str) -> None:
        self._drop(self.get(engine_id), reason="deleted")

    def runtime_cache_file(self, engine_id: str) -> Path:
        """Where the runtime cache of engine ``engine_id`` lives (the file may not exist yet)."""
        return self.runtime_caches / f"{engine_id}.runtime.cache"

    def _drop(self, record: EngineRecord, *, reason: DropReason = "damaged") -> None:
        """Remove the engine's row, then every file no other engine or job still needs.

        Shared bytes stay: a plan, calibration cache or derived model is content-addressed and may
        be another engine's too (or, for a calibration cache, a quantization job's result). The
        build jobs that made the engine get a note saying it is gone and why.
        """
        self.db.execute("DELETE FROM engines WHERE id = ?", (record.id,))
        self._touched.pop(record.id, None)
        self.runtime_cache_file(record.id).unlink(missing_ok=True)
        for listener in self._drop_listeners:
            listener(record.id)
        if not self.db.query_one("SELECT 1 FROM engines WHERE plan_sha256 = ?", (record.plan_sha256,)):
            self.plans.delete(record.plan_sha256)
        cache_sha = record.calibration_cache_sha256
        if cache_sha is not None and not self._artifact_in_use(cache_sha):
            self.artifacts.delete(cache_sha)
        if self.derived_models is not None:
            self.derived_models.discard_derived(record.built_model_id)
        self.db.execute(
            "UPDATE jobs SET result_json = json_set(result_json, '$.engine_removed', json(?)) "
            "WHERE kind = 'build' AND status = 'succeeded' AND json_extract(result_json, '$.engine_id') = ?",
            (json.dumps(engine_removed_note(reason, utc_now())), record.id),
        )

    def _artifact_in_use(self, digest: str) -> bool:
        """Whether another engine or a finished quantization job still refers to this artifact."""
        return (
            self.db.query_one("SELECT 1 FROM engines WHERE calibration_cache_sha256 = ?", (digest,))
            is not None
            or self.db.query_one(
                "SELECT 1 FROM jobs WHERE kind = 'quantization' AND result_json LIKE ?", (f'%"{digest}"%',)
            )
            is not None
        )

    def reconcile(self, *, min_orphan_age_s: float = 0.0) -> dict[str, int]:
        """Make the index and the files agree: drop rows without a file, quarantine files without a row.

        A plan without a row cannot be served again (its key, backend and report were in the row),
        but it may be an engine a client was told is stored whose row a power loss took, so it is
        moved to ``plans/.quarantine/`` rather than deleted. ``min_orphan_age_s`` spares plan files
        younger than that (a build in another process writes the file before its row).
        """
        dropped_rows = 0
        for record in self.list():
            if not self.plans.exists(record.plan_sha256):
                self._drop(record)
                dropped_rows += 1
        referenced = {r["plan_sha256"] for r in self.db.query("SELECT plan_sha256 FROM engines")}
        quarantined_files = 0
        cutoff = time.time() - min_orphan_age_s
        for digest in list(self.plans.digests()):
            path = self.plans.path_for(digest)
            if digest not in referenced and path.stat().st_mtime <= cutoff:
                quarantine(path, self.plans.root, reason="engine plan without a row")
                quarantined_files += 1
        return {"dropped_rows": dropped_rows, "quarantined_files": quarantined_files}
