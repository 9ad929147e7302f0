"""The model catalog: uploaded and derived ONNX models, their bytes and their summaries.

A model's id is the sha256 of its bytes, so the same upload twice is one record. Registration
validates first and writes second: the blob is committed and the row inserted only after the bytes
parsed and passed the checker, and a failed registration removes its staged file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import onnx

from service.accuracy.tasks import TaskSpec
from service.errors import Conflict, InvalidModel, NotFound, ServiceError
from service.onnx_graph.graph_limits import GraphLimits, check_graph_size
from service.onnx_graph.inspect import ModelInfo, model_info
from service.onnx_graph.loading import model_from_bytes
from service.store.blobs import BlobStore, StagedUpload
from service.store.clock import utc_now
from service.store.db import Database
from service.store.ids import resolve_id
from service.store.keyed_locks import KeyedLocks
from service.store.quarantine import quarantine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRecord:
    id: str
    name: str
    size_bytes: int
    info: ModelInfo
    source: str  # upload | quantization | build | recovered (re-registered from its file at start-up)
    parent_id: str | None
    created_at: str
    task: TaskSpec | None = None  # named by the user; None: guessed from the outputs when judged

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "size_bytes": self.size_bytes,
            "source": self.source,
            "parent_id": self.parent_id,
            "created_at": self.created_at,
            "task": self.task.model_dump(exclude_none=True) if self.task else None,
            **self.info.to_dict(),
        }


def _record(row: Any) -> ModelRecord:
    return ModelRecord(
        id=row["id"],
        name=row["name"],
        size_bytes=int(row["size_bytes"]),
        info=ModelInfo.from_dict(json.loads(row["info_json"])),
        source=row["source"],
        parent_id=row["parent_id"],
        created_at=row["created_at"],
        task=TaskSpec.model_validate_json(row["task_json"]) if row["task_json"] else None,
    )


class ModelCatalog:
    def __init__(self, db: Database, blobs: BlobStore, *, upload_limits: GraphLimits | None = None) -> None:
        self.db = db
        self.blobs = blobs
        # Bounds on what analysing an upload may cost; models the service derives are not bounded.
        self.upload_limits = upload_limits
        self._placing = KeyedLocks()

    def register_staged(
        self, staged: StagedUpload, name: str, *, source: str = "upload", parent_id: str | None = None
    ) -> tuple[ModelRecord, bool]:
        """Validate a fully streamed upload and store it; the staged file is consumed either way."""
        try:
            staged.finish()
            # Held until the row is in: a derived model being discarded (discard_derived) is either
            # gone before this looks, and stored again, or still there and found.
            with self._placing.hold(staged.sha256):
                existing = self._find(staged.sha256)
                if existing is not None:
                    staged.discard()
                    return existing, False
                data = staged.path.read_bytes()
                if source == "upload" and self.upload_limits is not None:
                    check_graph_size(data, self.upload_limits)  # before parsing: its cost grows per node
                model = model_from_bytes(data)
                del data
                info = model_info(model)
                blob = self.blobs.commit(staged)
                return self._insert(blob.sha256, name, blob.size_bytes, info, source, parent_id), True
        except BaseException:
            staged.discard()
            raise

    def add_model(
        self, model: onnx.ModelProto | bytes, name: str, *, source: str, parent_id: str | None = None
    ) -> tuple[ModelRecord, bool]:
        """Store a model the service produced (a Q/DQ model, an FP16-typed build input)."""
        data = model if isinstance(model, bytes) else model.SerializeToString()
        staged = self.blobs.stage(max_bytes=len(data))
        staged.write(data)
        return self.register_staged(staged, name, source=source, parent_id=parent_id)

    def _insert(
        self, model_id: str, name: str, size: int, info: ModelInfo, source: str, parent_id: str | None
    ) -> ModelRecord:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
            if row is not None:  # a concurrent upload of the same bytes won the race
                return _record(row)
            conn.execute(
                "INSERT INTO models (id, name, size_bytes, info_json, source, parent_id, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (model_id, name, size, json.dumps(info.to_dict()), source, parent_id, utc_now()),
            )
            return _record(conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone())

    def _find(self, model_id: str) -> ModelRecord | None:
        """The model ``model_id`` names exactly or by a unique prefix (Conflict when ambiguous)."""
        full_id = resolve_id(self.db, "models", model_id, noun="model")
        if full_id is None:
            return None
        row = self.db.query_one("SELECT * FROM models WHERE id = ?", (full_id,))
        return _record(row) if row is not None else None

    def get(self, model_id: str) -> ModelRecord:
        record = self._find(model_id)
        if record is None:
            raise NotFound(f"No model with id '{model_id}'. List models with GET /v1/models.")
        return record

    def set_task(self, model_id: str, task: TaskSpec | None) -> ModelRecord:
        """Name (or, with None, forget) the task that judges this model's INT8 accuracy."""
        self.get(model_id)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE models SET task_json = ? WHERE id = ?",
                (task.model_dump_json(exclude_none=True) if task else None, model_id),
            )
        return self.get(model_id)

    def list(self, *, source: str | None = None) -> list[ModelRecord]:
        if source is None:
            rows = self.db.query("SELECT * FROM models ORDER BY created_at DESC")
        else:
            rows = self.db.query("SELECT * FROM models WHERE source = ? ORDER BY created_at DESC", (source,))
        return [_record(r) for r in rows]

    def read_bytes(self, model_id: str) -> bytes:
        return self.blobs.read_bytes(self.get(model_id).id)

    def load(self, model_id: str) -> onnx.ModelProto:
        return model_from_bytes(self.read_bytes(model_id), check=False)

    def reconcile(self, *, min_orphan_age_s: float = 0.0) -> dict[str, int]:
        """Give every model file without a row its row back, or quarantine it; never delete it.

        A file without a row is either a crash between the blob commit and the insert, or a model a
        client was told is stored whose row a power loss took: its bytes say what it is, so it is
        registered again (source ``recovered``). A file that no longer parses is moved to
        ``.quarantine/``. Files younger than ``min_orphan_age_s`` are spared: another process may be
        about to insert their row itself.
        """
        known = {row["id"] for row in self.db.query("SELECT id FROM models")}
        cutoff = time.time() - min_orphan_age_s
        counts = {"recovered": 0, "quarantined": 0}
        for digest in list(self.blobs.digests()):
            path = self.blobs.path_for(digest)
            if digest in known or path.stat().st_mtime > cutoff:
                continue
            try:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise InvalidModel("the file does not match its sha256 name")
                info = model_info(model_from_bytes(data))
            except ServiceError as exc:
                quarantine(path, self.blobs.root, reason=f"model file without a row: {exc}")
                counts["quarantined"] += 1
                continue
            self._insert(digest, f"recovered-{digest[:12]}.onnx", len(data), info, "recovered", None)
            logger.warning("model %s had a file but no row; registered it again as recovered", digest)
            counts["recovered"] += 1
        return counts

    def discard_derived(self, model_id: str) -> bool:
        """Remove a model a build derived (source ``build``) once no engine and no active job uses it.

        Called when an engine leaves the cache: its exact build input (a Q/DQ or FP16-typed ONNX)
        belongs to it alone unless another engine was built from the same bytes. Uploaded,
        quantization and recovered models are never touched. Returns whether it was removed.
        """
        with self._placing.hold(model_id), self.db.transaction() as conn:
            removed = conn.execute(
                "DELETE FROM models WHERE id = ? AND source = 'build' "
                "AND NOT EXISTS (SELECT 1 FROM engines WHERE model_id = ? OR built_model_id = ?) "
                "AND NOT EXISTS (SELECT 1 FROM jobs WHERE status IN ('queued', 'running') "
                "AND params_json LIKE ?)",
                (model_id, model_id, model_id, f'%"{model_id}"%'),
            ).rowcount
            if removed:  # inside the transaction: a failed unlink keeps the row
                self.blobs.delete(model_id)
        return bool(removed)

    def delete(self, model_id: str) -> None:
        model_id = self.get(model_id).id
        engines = self.db.query(
            "SELECT id FROM engines WHERE model_id = ? OR built_model_id = ? LIMIT 5", (model_id, model_id)
        )
        if engines:
            ids = ", ".join(r["id"] for r in engines)
            raise Conflict(
                f"Model {model_id} has engines ({ids}); delete them first with DELETE /v1/engines/{{id}}."
            )
        active = self.db.query(
            "SELECT id FROM jobs WHERE status IN ('queued', 'running') AND params_json LIKE ? LIMIT 5",
            (f'%"{model_id}"%',),
        )
        if active:
            ids = ", ".join(r["id"] for r in active)
            raise Conflict(f"Model {model_id} is used by active jobs ({ids}); cancel them or wait.")
        self.db.execute("DELETE FROM models WHERE id = ?", (model_id,))
        self.blobs.delete(model_id)
