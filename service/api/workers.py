"""The internal API of remote build workers: job rows, inputs and finished engines over HTTP.

A worker on another host cannot open the service database, so everything it would read or write there
goes through these routes (:mod:`service.remote` is the other end). The edge middleware lets only
holders of the worker token in (:data:`service.remote.protocol.WORKER_PATH_PREFIX`); the routes are left out
of the public OpenAPI schema because they are a protocol between this server and its own workers.

The server stays the judge of every transition: a job is claimed once (queued -> running), progress
and logs are taken only while it runs, it is finished once, and a build may report success only after
its engine was uploaded under the very key the server queued it for.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import __version__
from service.api.deps import ServicesDep
from service.api.downloads import file_download
from service.api.jobs_common import JobState, job_state
from service.builds.job_params import BuildJobParams
from service.builds.storage import BuildOutput, LocalBuildStorage
from service.builds.submit import BUILD_JOB
from service.catalog.build_report import BuildReport
from service.catalog.engine_keys import PREPARATION_VERSION
from service.errors import BadInput, Conflict, NotFound, Unauthorized
from service.jobs.records import JobRecord
from service.remote.protocol import WORKER_ROUTE_PREFIX

WORKER_LOG_CHUNK_CHARS = 64_000
_FILE_EXTENSION = re.compile(r"^\.[a-z0-9]{1,12}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _require_worker(request: Request) -> None:
    # The middleware already checked the token; this makes the routes refuse any path around it.
    if not getattr(request.state, "worker", False):
        raise Unauthorized("Only remote workers holding the worker token may call this.")


router = APIRouter(
    prefix=WORKER_ROUTE_PREFIX,
    tags=["workers"],
    include_in_schema=False,
    dependencies=[Depends(_require_worker)],
)


class WorkerJob(JobState):
    """A job row as a worker sees it (the log is left out: a worker only appends to it)."""

    result: dict[str, Any] | None
    cancel_requested: bool

    @classmethod
    def of(cls, record: JobRecord) -> WorkerJob:
        return cls(**job_state(record), result=record.result, cancel_requested=record.cancel_requested)


class ProgressIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    progress: float = Field(ge=0.0, le=1.0)
    phase: str | None = Field(default=None, max_length=100)


class LogIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=WORKER_LOG_CHUNK_CHARS)


class FinishIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["succeeded", "failed", "cancelled"]
    result: dict[str, Any] | None = None
    error: str | None = Field(default=None, max_length=10_000)


class CancelState(BaseModel):
    cancel_requested: bool


class StoredFile(BaseModel):
    name: str
    size_bytes: int


class CalibrationSetFiles(BaseModel):
    id: str
    files: list[StoredFile]


class EngineRef(BaseModel):
    engine_id: str
    built_model_id: str | None = None


class EngineUploadMeta(BaseModel):
    """What a worker declares about the files it uploads with a finished build."""

    model_config = ConfigDict(extra="forbid")
    built_model_name: str = Field(min_length=1, max_length=300)
    built_model_sha256: str
    engine_sha256: str
    calibration_cache_sha256: str | None = None
    file_extension: str
    build_seconds: float = Field(ge=0.0)
    report: dict[str, Any]
    # Which of the job's keys this engine is for (a precision "auto" build stores up to two engines);
    # None: the job's own key.
    key_digest: str | None = None


def _running(services: ServicesDep, job_id: str) -> JobRecord:
    record = services.jobs.get(job_id)
    if record.status != "running":
        raise Conflict(f"Job {job_id} is {record.status}, not running; nothing more can be reported for it.")
    return record


class ServerIdentity(BaseModel):
    version: str
    preparation_version: int


@router.get("/hello", response_model=ServerIdentity)
def hello() -> ServerIdentity:
    """What a worker checks at start: the token works, and both sides prepare models the same way."""
    return ServerIdentity(version=__version__, preparation_version=PREPARATION_VERSION)


@router.get("/jobs/{job_id}", response_model=WorkerJob)
def read_job(job_id: str, services: ServicesDep) -> WorkerJob:
    return WorkerJob.of(services.jobs.get(job_id))


class ClaimIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    claimant: str = Field(
        min_length=8, max_length=300, description="Unique per attempt: the same claimant may claim again."
    )


@router.post("/jobs/{job_id}/claim", response_model=WorkerJob)
def claim_job(job_id: str, body: ClaimIn, services: ServicesDep) -> WorkerJob:
    """queued -> running for one worker; 409 when it was cancelled meanwhile or another worker has it."""
    services.jobs.get(job_id)  # 404 for an unknown id
    if not services.jobs.mark_running(job_id, claimant=body.claimant):
        raise Conflict(f"Job {job_id} is {services.jobs.get(job_id).status}; it cannot be taken.")
    return WorkerJob.of(services.jobs.get(job_id))


@router.post("/jobs/{job_id}/progress", response_model=CancelState)
def report_progress(job_id: str, body: ProgressIn, services: ServicesDep) -> CancelState:
    record = _running(services, job_id)
    services.jobs.update_progress(job_id, body.progress, body.phase)
    services.jobs.beat(job_id)
    return CancelState(cancel_requested=record.cancel_requested)


@router.post("/jobs/{job_id}/heartbeat", response_model=CancelState)
def heartbeat(job_id: str, services: ServicesDep) -> CancelState:
    """The worker is alive and still running the job (see service.jobs.leases); 409 once it has ended."""
    record = _running(services, job_id)
    services.jobs.beat(job_id)
    return CancelState(cancel_requested=record.cancel_requested)


@router.post("/jobs/{job_id}/log", response_model=CancelState)
def append_log(job_id: str, body: LogIn, services: ServicesDep) -> CancelState:
    record = services.jobs.get(job_id)
    # A worker flushes what it logged up to the end, so lines arriving with or just after the
    # final state are still kept; a job that never ran takes none.
    if record.started_at is None:
        raise Conflict(f"Job {job_id} has not been claimed; it takes no log.")
    services.jobs.append_log(job_id, body.text)
    return CancelState(cancel_requested=record.cancel_requested)


@router.get("/jobs/{job_id}/cancel", response_model=CancelState)
def read_cancel(job_id: str, services: ServicesDep) -> CancelState:
    return CancelState(cancel_requested=services.jobs.cancel_requested(job_id))


@router.post("/jobs/{job_id}/finish", response_model=WorkerJob)
def finish_job(job_id: str, body: FinishIn, services: ServicesDep) -> WorkerJob:
    record = _running(services, job_id)
    if body.status == "succeeded" and record.kind == BUILD_JOB:
        engine_id = (body.result or {}).get("engine_id")
        allowed = BuildJobParams.from_json(record.params).keys()  # its own key; an auto build's fallback too
        if engine_id not in allowed or services.engines.lookup(str(engine_id)) is None:
            raise Conflict(
                f"Build {job_id} cannot succeed before its engine {' or '.join(allowed)} is uploaded "
                "(POST /v1/worker/jobs/{id}/engine)."
            )
    if body.status != "succeeded" and not body.error:
        raise BadInput("A failed or cancelled job needs an error that says why.")
    if not services.jobs.finish(
        job_id, body.status, result=body.result, error=body.error, only_if_running=True
    ):
        raise Conflict(f"Job {job_id} ended meanwhile; its final state stays as it is.")
    final = services.jobs.get(job_id)
    services.runner.notify_finished(final)  # metrics see remote builds as they see local ones
    return WorkerJob.of(final)


@router.get("/models/{model_id}")
def download_model(model_id: str, services: ServicesDep) -> FileResponse:
    services.models.get(model_id)
    path = services.model_blobs.path_for(model_id)
    if not path.is_file():
        raise NotFound(f"Model {model_id} has a record but no file on this server; upload it again.")
    return file_download(path, media_type="application/octet-stream", filename=f"{model_id}.onnx")


@router.get("/calibration-sets/{set_id}", response_model=CalibrationSetFiles)
def list_calibration_files(set_id: str, services: ServicesDep) -> CalibrationSetFiles:
    directory = services.calibration_sets.directory(set_id)
    files = [
        StoredFile(name=path.name, size_bytes=path.stat().st_size)
        for path in sorted(directory.iterdir())
        if path.is_file() and not path.is_symlink()
    ]
    return CalibrationSetFiles(id=set_id, files=files)


@router.get("/calibration-sets/{set_id}/files/{name}")
def download_calibration_file(set_id: str, name: str, services: ServicesDep) -> FileResponse:
    directory = services.calibration_sets.directory(set_id)
    # Only a plain file listed in the set's own directory: no separators, no dot-names, no links.
    path = directory / name
    if "/" in name or "\\" in name or name.startswith(".") or not path.is_file() or path.is_symlink():
        raise NotFound(f"Calibration set {set_id} has no file '{name}'.")
    return file_download(path, media_type="application/octet-stream", filename=name)


@router.get("/engines/{key_digest}", response_model=EngineRef)
def read_cached_engine(key_digest: str, services: ServicesDep) -> EngineRef:
    cached = services.engines.lookup(key_digest)
    if cached is None:
        raise NotFound(f"No engine is cached under key {key_digest}.")
    return EngineRef(engine_id=cached.id, built_model_id=cached.built_model_id)


def _checked(data: bytes, declared: str, what: str) -> bytes:
    if not _SHA256.match(declared):
        raise BadInput(f"{what}: the declared sha256 must be 64 lowercase hex digits.")
    actual = hashlib.sha256(data).hexdigest()
    if actual != declared:
        raise BadInput(f"{what} arrived damaged: sha256 {actual}, the worker declared {declared}.")
    return data


@router.post("/jobs/{job_id}/engine", response_model=EngineRef)
def upload_engine(
    job_id: str,
    services: ServicesDep,
    metadata: Annotated[str, Form(description="JSON: EngineUploadMeta")],
    built_model: Annotated[UploadFile, File()],
    engine: Annotated[UploadFile, File()],
    calibration_cache: Annotated[UploadFile | None, File()] = None,
) -> EngineRef:
    """Store a remote build's engine in this server's cache, under the key the job was queued with."""
    record = _running(services, job_id)
    if record.kind != BUILD_JOB:
        raise Conflict(f"Job {job_id} is a {record.kind} job; only builds upload engines.")
    try:
        meta = EngineUploadMeta.model_validate(json.loads(metadata))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise BadInput(f"The upload's metadata is not valid: {exc}") from exc
    if not _FILE_EXTENSION.match(meta.file_extension):
        raise BadInput(f"file_extension '{meta.file_extension}' is not a plain extension such as '.plan'.")
    params = BuildJobParams.from_json(record.params)
    job_keys = params.keys()
    key = params.key
    if meta.key_digest is not None:
        if meta.key_digest not in job_keys:
            raise Conflict(f"Job {job_id} builds none of the engine key {meta.key_digest}.")
        key = job_keys[meta.key_digest]
    built_for = BuildReport.from_dict(meta.report).backend
    identity = {
        "name": key.backend.name,
        "version": key.backend.version,
        "device": key.backend.device,
        "compute_capability": key.backend.compute_capability,
    }
    if {name: built_for.get(name) for name in identity} != identity:
        raise Conflict(
            f"The worker built for {built_for}, but job {job_id} is queued for {identity}; "
            "that worker listens on a queue it cannot serve."
        )
    model_bytes = _checked(built_model.file.read(), meta.built_model_sha256, "The built model")
    engine_bytes = _checked(engine.file.read(), meta.engine_sha256, "The engine")
    if not engine_bytes:
        raise BadInput("The engine is empty.")
    cache_bytes: bytes | None = None
    if calibration_cache is not None or meta.calibration_cache_sha256 is not None:
        if calibration_cache is None or meta.calibration_cache_sha256 is None:
            raise BadInput("A calibration cache needs both the file and its declared sha256.")
        declared = meta.calibration_cache_sha256
        cache_bytes = _checked(calibration_cache.file.read(), declared, "The calibration cache")
    # The key is the server's own, from the job it queued: a worker cannot store under another key.
    output = BuildOutput(
        key=key,
        built_model=model_bytes,
        built_model_name=meta.built_model_name,
        engine_bytes=engine_bytes,
        file_extension=meta.file_extension,
        build_seconds=meta.build_seconds,
        report=meta.report,
        calibration_cache=cache_bytes,
    )
    engine_id = LocalBuildStorage(services.models, services.calibration_sets, services.engines).store(output)
    return EngineRef(engine_id=engine_id, built_model_id=services.engines.get(engine_id).built_model_id)
