"""The calibration-set catalog: ingest uploads into their canonical stored form, list, open, delete.

A set's id is the sha256 of the uploaded bytes, extended with the canonical preprocessing JSON when
images were preprocessed (the same archive preprocessed two ways is two sets). The stored form lives
in ``<calibration_dir>/<id>/`` (one memory-mappable ``.npy`` per input plus ``info.json``), written
by :func:`service.datasets.ingest.ingest_calibration_upload` into a temporary directory and
renamed into place, so a failed ingest leaves neither files nor a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.datasets.ingest import ingest_calibration_upload
from service.datasets.preprocess import UNBOUNDED_PREPROCESS, PreprocessLimits, PreprocessSpec
from service.datasets.set_info import INFO_FILE, CalibrationSetInfo
from service.datasets.storage import CalibrationSet, bind_to_model
from service.datasets.zip_stream import UNBOUNDED_MEMBERS, ExpansionLimits
from service.errors import Conflict, NotFound
from service.onnx_graph.inspect import TensorSpec
from service.store.blobs import StagedUpload
from service.store.clock import utc_now
from service.store.db import Database
from service.store.ids import resolve_id
from service.store.keyed_locks import KeyedLocks
from service.store.quarantine import quarantine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSetRecord:
    id: str
    name: str
    size_bytes: int
    info: CalibrationSetInfo
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            **self.info.to_dict(),
        }


def _record(row: Any) -> CalibrationSetRecord:
    return CalibrationSetRecord(
        id=row["id"],
        name=row["name"],
        size_bytes=int(row["size_bytes"]),
        info=CalibrationSetInfo.from_dict(json.loads(row["info_json"])),
        created_at=row["created_at"],
    )


def _stored_info(directory: Path) -> CalibrationSetInfo | None:
    """The info of a complete set stored at ``directory``, or None when there is none to adopt."""
    try:
        return CalibrationSetInfo.from_dict(json.loads((directory / INFO_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def calibration_set_id(upload_sha256: str, preprocess: PreprocessSpec | None) -> str:
    if preprocess is None:
        return upload_sha256
    canonical = json.dumps(preprocess.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{upload_sha256}\n{canonical}".encode()).hexdigest()


class CalibrationCatalog:
    def __init__(
        self,
        db: Database,
        root: Path,
        *,
        max_archive_members: int,
        max_archive_uncompressed_bytes: int,
        member_limits: ExpansionLimits = UNBOUNDED_MEMBERS,
        preprocess_limits: PreprocessLimits = UNBOUNDED_PREPROCESS,
    ) -> None:
        self.db = db
        self.root = root
        self.max_archive_members = max_archive_members
        self.max_archive_uncompressed_bytes = max_archive_uncompressed_bytes
        self.member_limits = member_limits
        self.preprocess_limits = preprocess_limits
        self._placing = KeyedLocks()
        root.mkdir(parents=True, exist_ok=True)

    def directory(self, set_id: str) -> Path:
        self.get(set_id)
        return self.root / set_id

    def register_staged(
        self,
        staged: StagedUpload,
        name: str,
        *,
        preprocess: PreprocessSpec | None,
        model_inputs: Sequence[TensorSpec] | None = None,
    ) -> tuple[CalibrationSetRecord, bool]:
        """Ingest a streamed upload; validates against ``model_inputs`` when given. Consumes ``staged``.

        Returns the record and whether this call created it. Identical uploads at the same time are
        serialized on their set id: one ingests, the others find its row (HTTP 200). A set directory
        without a row is a complete set (it is only ever renamed into place whole), left by a crash
        between the rename and the insert: it is adopted, never deleted, because in another process
        it may be a set that request is about to insert.
        """
        try:
            staged.finish()
            set_id = calibration_set_id(staged.sha256, preprocess)
            with self._placing.hold(set_id):
                existing = self._find(set_id)
                if existing is not None:
                    if model_inputs is not None:
                        bind_to_model(existing.info, model_inputs)
                    return existing, False
                dest = self.root / set_id
                info = _stored_info(dest)
                placed_here = info is None
                if info is None:
                    info = ingest_calibration_upload(
                        staged.path,
                        name,
                        dest,
                        preprocess=preprocess,
                        max_members=self.max_archive_members,
                        max_uncompressed_bytes=self.max_archive_uncompressed_bytes,
                        limits=self.member_limits,
                        preprocess_limits=self.preprocess_limits,
                    )
                try:
                    if model_inputs is not None:
                        bind_to_model(info, model_inputs)
                    record = self._insert(set_id, name, staged.size_bytes, info)
                except BaseException:
                    if placed_here:
                        shutil.rmtree(dest, ignore_errors=True)
                    raise
                return record, True
        finally:
            staged.discard()

    def _insert(self, set_id: str, name: str, size: int, info: CalibrationSetInfo) -> CalibrationSetRecord:
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO calibration_sets "
                "(id, name, format, size_bytes, samples, info_json, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (set_id, name, info.format, size, info.samples, json.dumps(info.to_dict()), utc_now()),
            )
            return _record(conn.execute("SELECT * FROM calibration_sets WHERE id = ?", (set_id,)).fetchone())

    def _find(self, set_id: str) -> CalibrationSetRecord | None:
        """The set ``set_id`` names exactly or by a unique prefix (Conflict when ambiguous)."""
        full_id = resolve_id(self.db, "calibration_sets", set_id, noun="calibration set")
        if full_id is None:
            return None
        row = self.db.query_one("SELECT * FROM calibration_sets WHERE id = ?", (full_id,))
        return _record(row) if row is not None else None

    def get(self, set_id: str) -> CalibrationSetRecord:
        record = self._find(set_id)
        if record is None:
            raise NotFound(f"No calibration set with id '{set_id}'. List them with GET /v1/calibration-sets.")
        return record

    def list(self) -> list[CalibrationSetRecord]:
        return [_record(r) for r in self.db.query("SELECT * FROM calibration_sets ORDER BY created_at DESC")]

    def open(self, set_id: str) -> CalibrationSet:
        return CalibrationSet.open(self.directory(self.get(set_id).id))

    def bind(self, set_id: str, model_inputs: Sequence[TensorSpec]) -> dict[str, str]:
        """Map model input names to stored arrays, or raise InvalidCalibrationSet saying what differs."""
        return bind_to_model(self.get(set_id).info, model_inputs)

    def delete(self, set_id: str) -> None:
        set_id = self.get(set_id).id
        with self._placing.hold(set_id):
            self._delete(set_id)

    def _delete(self, set_id: str) -> None:
        self.get(set_id)
        active = self.db.query(
            "SELECT id FROM jobs WHERE status IN ('queued', 'running') AND params_json LIKE ? LIMIT 5",
            (f'%"{set_id}"%',),
        )
        if active:
            ids = ", ".join(r["id"] for r in active)
            raise Conflict(f"Calibration set {set_id} is used by active jobs ({ids}); cancel them or wait.")
        self.db.execute("DELETE FROM calibration_sets WHERE id = ?", (set_id,))
        shutil.rmtree(self.root / set_id, ignore_errors=True)

    def reconcile(self, *, min_orphan_age_s: float = 0.0) -> dict[str, int]:
        """Make the folders agree with the rows without losing a set a client was told is stored.

        Unfinished ingests (``.tmp-*``) are removed: they were never acknowledged. A complete set
        directory without a row (its ``info.json`` reads) is registered again as ``recovered-<id>``;
        one whose info does not read is moved to ``.quarantine/``. Directories younger than
        ``min_orphan_age_s`` are spared: another process may be about to insert their row itself.
        """
        cutoff = time.time() - min_orphan_age_s
        known = {r["id"] for r in self.db.query("SELECT id FROM calibration_sets")}
        counts = {"removed_partial": 0, "recovered": 0, "quarantined": 0}
        for path in list(self.root.iterdir()):
            if not path.is_dir():
                continue
            if path.name.startswith(".tmp-"):  # ingest builds in .tmp-* and renames at the end
                shutil.rmtree(path, ignore_errors=True)
                counts["removed_partial"] += 1
            elif len(path.name) == 64 and path.name not in known and path.stat().st_mtime <= cutoff:
                info = _stored_info(path)
                if info is None:
                    quarantine(path, self.root, reason="calibration set directory without a row or info.json")
                    counts["quarantined"] += 1
                    continue
                size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
                self._insert(path.name, f"recovered-{path.name[:12]}", size, info)
                logger.warning("calibration set %s had files but no row; registered it again", path.name)
                counts["recovered"] += 1
        return counts
