"""A remote worker's build storage: inputs downloaded from the API server, engines uploaded to it.

Models and calibration sets are content-addressed (a model's id is its sha256; a calibration set's id
is the sha256 of its upload), so a downloaded copy never goes stale: the worker keeps them in
:class:`WorkerCache` and reuses them for later builds. Each entry is written in a temporary sibling
and renamed into place, so several worker processes can share one cache directory and a crash leaves
only temporaries, which the next start removes. Entries are evicted least recently used once the cache
passes its budget (a set still memory-mapped by a running build stays readable: Linux keeps an
unlinked file's data until it is closed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import onnx

from service.builds.storage import BuildOutput
from service.datasets.storage import CalibrationSet, bind_to_model
from service.errors import BadInput, DownloadDamaged
from service.onnx_graph.inspect import TensorSpec
from service.onnx_graph.loading import model_from_bytes
from service.remote.client import WorkerApi

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")
_TEMPORARY_PREFIX = ".tmp-"


def _checked_id(value: str, what: str) -> str:
    if not _ID.match(value):
        raise BadInput(f"'{value}' is not a {what} id (64 lowercase hex digits).")
    return value


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())


class WorkerCache:
    """Models and calibration sets this worker downloaded, under ``root``, kept within ``budget_bytes``."""

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.models = root / "models"
        self.calibration = root / "calibration"
        for directory in (self.models, self.calibration):
            directory.mkdir(parents=True, exist_ok=True)
            for leftover in directory.glob(f"{_TEMPORARY_PREFIX}*"):
                # Only old ones: a sibling worker process may be downloading into a fresh one.
                if time.time() - leftover.stat().st_mtime > 3600:
                    _remove(leftover)

    def model(self, api: WorkerApi, model_id: str) -> Path:
        path = self.models / f"{_checked_id(model_id, 'model')}.onnx"
        if path.exists():
            path.touch()
            return path
        api.download_model(model_id, path)
        return path

    def calibration_set(self, api: WorkerApi, set_id: str) -> Path:
        directory = self.calibration / _checked_id(set_id, "calibration set")
        if directory.is_dir():
            directory.touch()
            return directory
        staging = Path(tempfile.mkdtemp(dir=self.calibration, prefix=_TEMPORARY_PREFIX))
        try:
            for name, size in api.calibration_files(set_id):
                if not _FILE_NAME.match(name):
                    raise DownloadDamaged(
                        f"The API server listed an unsafe file name '{name}' in set {set_id}."
                    )
                api.download_calibration_file(set_id, name, size, staging / name)
            try:
                os.rename(staging, directory)
            except OSError:
                if not directory.is_dir():  # not "another worker process renamed its copy first"
                    raise
        finally:
            _remove(staging)
        return directory

    def prune(self, *, keep: Sequence[Path] = ()) -> list[Path]:
        """Evict least recently used entries until the cache fits its budget; returns what went."""
        entries = [
            path
            for directory in (self.models, self.calibration)
            for path in directory.iterdir()
            if not path.name.startswith(_TEMPORARY_PREFIX)
        ]
        sizes = {path: _size(path) for path in entries}
        total = sum(sizes.values())
        evicted: list[Path] = []
        kept = {path.resolve() for path in keep}
        for path in sorted(entries, key=lambda p: p.stat().st_mtime):
            if total <= self.budget_bytes:
                break
            if path.resolve() in kept:
                continue
            _remove(path)
            total -= sizes[path]
            evicted.append(path)
        if evicted:
            logger.info(
                "worker cache: evicted %d entries to stay within %d bytes", len(evicted), self.budget_bytes
            )
        return evicted


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class RemoteBuildStorage:
    """:class:`~service.builds.storage.BuildStorage` for one job run by a worker on another host."""

    def __init__(self, api: WorkerApi, cache: WorkerCache, job_id: str) -> None:
        self.api = api
        self.cache = cache
        self.job_id = job_id
        self._used: list[Path] = []

    def cached_engine_id(self, key_digest: str) -> str | None:
        return self.api.cached_engine_id(key_digest)

    def load_model(self, model_id: str) -> onnx.ModelProto:
        path = self.cache.model(self.api, model_id)
        self._used.append(path)
        return model_from_bytes(path.read_bytes(), check=False)

    def calibration_set(
        self, set_id: str, model_inputs: Sequence[TensorSpec]
    ) -> tuple[CalibrationSet, dict[str, str]]:
        directory = self.cache.calibration_set(self.api, set_id)
        self._used.append(directory)
        dataset = CalibrationSet.open(directory)
        return dataset, bind_to_model(dataset.info, model_inputs)

    def store(self, output: BuildOutput) -> str:
        model_sha = hashlib.sha256(output.built_model).hexdigest()
        metadata = {
            "built_model_name": output.built_model_name,
            "built_model_sha256": model_sha,
            "engine_sha256": hashlib.sha256(output.engine_bytes).hexdigest(),
            "calibration_cache_sha256": (
                hashlib.sha256(output.calibration_cache).hexdigest() if output.calibration_cache else None
            ),
            "file_extension": output.file_extension,
            "build_seconds": output.build_seconds,
            "report": output.report,
            "key_digest": output.key.digest,
        }
        stored = self.api.upload_engine(
            self.job_id,
            metadata,
            built_model=output.built_model,
            engine=output.engine_bytes,
            calibration_cache=output.calibration_cache,
        )
        if stored.get("built_model_id") != model_sha:
            raise DownloadDamaged(
                f"The API server stored the built model as {stored.get('built_model_id')}, not {model_sha}."
            )
        return str(stored["engine_id"])

    def release(self) -> None:
        """The job is over: trim the cache, sparing what this job used (it is the most likely reuse)."""
        self.cache.prune(keep=self._used)
