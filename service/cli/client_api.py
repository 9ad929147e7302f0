"""The engine service's HTTP API as typed calls: what the client CLI and the local mode both use.

Contract:

- :class:`ApiClient` wraps one ``httpx.Client``: a real connection (:meth:`ApiClient.connect`) or
  starlette's ``TestClient`` around an in-process app (the local mode), so both modes send exactly
  the same requests.
- Every answer outside 2xx raises :class:`ApiError` with the server's error ``code`` and
  ``message`` (the body is ``{"error": {"code", "message"}}``); a route the server does not have is
  reported as such. Transport failures raise :class:`ServerUnreachable`, which says how to start a
  server.
- Downloads stream to a temporary file beside the destination, hashing as they write, and are
  renamed into place only when the hash equals the server's ``X-Content-SHA256``; otherwise the
  partial file is removed and :class:`~service.errors.DownloadDamaged` is raised.
- Resource documents (models, engines, reports) are returned as the server's JSON; the values the
  CLI acts on (jobs, build tickets, downloads) are small frozen dataclasses.
"""

from __future__ import annotations

import email.message
import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from service.errors import ApiError, DownloadDamaged, ServerUnreachable
from service.http_client import CHUNK_BYTES, error_fields, write_verified

if TYPE_CHECKING:
    import httpx
    import numpy as np

Document = dict[str, Any]
JobKind = Literal["build", "quantization", "report"]
DEFAULT_URL = "http://127.0.0.1:8000"
NPZ_MEDIA = "application/x-npz"

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
# Where each kind of job is read and cancelled; reports are read at /v1/reports/{id}.
JOB_COLLECTIONS: dict[JobKind, str] = {
    "build": "/v1/builds",
    "quantization": "/v1/quantizations",
    "report": "/v1/reports",
}


@dataclass(frozen=True)
class JobState:
    """One poll of a job: where it stands and, once it succeeded, its result document."""

    id: str
    kind: str
    status: str
    progress: float
    phase: str
    error: str | None
    log_tail: tuple[str, ...]
    result: Document | None
    document: Document

    @property
    def finished(self) -> bool:
        return self.status in FINAL_STATUSES

    @classmethod
    def from_document(cls, document: Document, *, kind: str, job_id: str | None = None) -> JobState:
        """A job document (``jobs_common.JobPublic``), or a finished report (the result itself)."""
        # A finished report answers with the report itself (status "succeeded" or no status at all);
        # every other job document carries its result under "result".
        status = str(document.get("status", "succeeded"))
        result = (
            document.get("result") if "result" in document else (document if status == "succeeded" else None)
        )
        progress = document.get("progress")
        return cls(
            id=str(document.get("id", job_id or "")),
            kind=str(document.get("kind", kind)),
            status=status,
            progress=float(progress) if progress is not None else (1.0 if status == "succeeded" else 0.0),
            phase=str(document.get("phase") or ""),
            error=document.get("error"),
            log_tail=tuple(str(line) for line in document.get("log_tail") or ()),
            result=result if isinstance(result, dict) else None,
            document=document,
        )


@dataclass(frozen=True)
class BuildTicket:
    """The answer to a build request: the engine id, and the job building it on a cache miss."""

    cache: Literal["hit", "miss"]
    engine_id: str | None  # None: a precision "auto" build, whose engine is chosen when it ends
    job_id: str | None
    joined_existing: bool
    precision_choice: dict[str, Any] | None = None  # precision "auto" answered from the cache


@dataclass(frozen=True)
class DownloadedFile:
    """A file written to disk by a download; ``verified`` when the server sent a hash and it matched."""

    path: Path
    sha256: str
    size_bytes: int
    verified: bool


@dataclass(frozen=True)
class Upload:
    """A resource created (or found: ``created`` False) by an upload."""

    document: Document
    created: bool


def _unreachable_message(url: str, reason: str) -> str:
    return (
        f"Cannot reach the engine service at {url} ({reason}). Start one with `engine-service serve` "
        "(or `docker compose up`), or point --url / ENGINE_SERVICE_URL at a running server. "
        "`engine-service local build` builds an engine without a server."
    )


def _error_from_response(response: httpx.Response, *, has_key: bool) -> ApiError:
    status = response.status_code
    request = response.request
    try:
        body = response.json()
    except ValueError:
        body = None
    fields = error_fields(response)
    if fields is not None:
        code, message = fields
    elif status in (404, 405) and isinstance(body, dict) and "detail" in body:
        # FastAPI's own answer for a path the server has no route for: an older server, most likely.
        message = (
            f"The server has no route for {request.method} {request.url.path} (HTTP {status}); "
            "it may run an older version of the engine service without this feature."
        )
        code = "no_route"
    else:
        snippet = response.text.strip()[:200] if body is None else str(body)[:200]
        message = f"The server answered HTTP {status} to {request.method} {request.url.path}: {snippet}"
        code = "http_error"
    if status == 401 and not has_key:
        message += " Pass --api-key or set ENGINE_SERVICE_API_KEY."
    return ApiError(message, status=status, code=code)


def filename_from_disposition(value: str | None) -> str | None:
    """The bare file name in a Content-Disposition header, with any directory part removed."""
    if not value:
        return None
    message = email.message.Message()
    message["content-disposition"] = value
    name = message.get_filename()
    if not name:
        return None
    base = Path(name.replace("\\", "/")).name
    return base if base not in ("", ".", "..") else None


class ApiClient:
    """Typed calls to the engine service over one ``httpx.Client``; use as a context manager."""

    def __init__(self, http: httpx.Client, *, label: str, has_key: bool = False) -> None:
        self.http = http
        self.label = label  # how errors name the server: its URL, or "the in-process service"
        self.has_key = has_key

    @classmethod
    def connect(cls, url: str, api_key: str | None, *, timeout_s: float = 30.0) -> ApiClient:
        """A client for the server at ``url``; reads may take long (inference, big downloads)."""
        import httpx

        headers = {"X-API-Key": api_key} if api_key else {}
        timeout = httpx.Timeout(timeout_s, read=max(timeout_s, 600.0))
        http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        return cls(http, label=url, has_key=bool(api_key))

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    # Transport -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; ApiError for an error status, ServerUnreachable when nothing answers."""
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(_unreachable_message(self.label, "timed out")) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(_unreachable_message(self.label, str(exc) or type(exc).__name__)) from exc
        if response.is_error:
            raise _error_from_response(response, has_key=self.has_key)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    @contextmanager
    def _stream(self, path: str) -> Iterator[httpx.Response]:
        import httpx

        try:
            with self.http.stream("GET", path) as response:
                if response.is_error:
                    response.read()
                    raise _error_from_response(response, has_key=self.has_key)
                yield response
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(_unreachable_message(self.label, "timed out")) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(_unreachable_message(self.label, str(exc) or type(exc).__name__)) from exc

    def _upload(self, path: str, file: Path, fields: Mapping[str, str | None]) -> Upload:
        data = {key: value for key, value in fields.items() if value is not None}
        with file.open("rb") as handle:
            # httpx reads the open file in chunks while sending: large uploads are not held in memory.
            response = self.request(
                "POST", path, files={"file": (file.name, handle, "application/octet-stream")}, data=data
            )
        return Upload(document=response.json(), created=response.status_code == 201)

    # Models --------------------------------------------------------------------------------------

    def upload_model(self, file: Path, *, name: str | None = None) -> Upload:
        return self._upload("/v1/models", file, {"name": name})

    def list_models(self, *, source: str | None = None) -> list[Document]:
        return list(self.json("GET", "/v1/models", params={"source": source} if source else None))

    def model(self, model_id: str) -> Document:
        return dict(self.json("GET", f"/v1/models/{model_id}"))

    def model_fusions(self, model_id: str) -> Document:
        return dict(self.json("GET", f"/v1/models/{model_id}/fusions"))

    def delete_model(self, model_id: str) -> None:
        self.request("DELETE", f"/v1/models/{model_id}")

    # Calibration sets ----------------------------------------------------------------------------

    def upload_calibration_set(
        self,
        file: Path,
        *,
        name: str | None = None,
        preprocess: str | None = None,
        model_id: str | None = None,
    ) -> Upload:
        fields = {"name": name, "preprocess": preprocess, "model_id": model_id}
        return self._upload("/v1/calibration-sets", file, fields)

    def list_calibration_sets(self) -> list[Document]:
        return list(self.json("GET", "/v1/calibration-sets"))

    def calibration_set(self, set_id: str) -> Document:
        return dict(self.json("GET", f"/v1/calibration-sets/{set_id}"))

    def delete_calibration_set(self, set_id: str) -> None:
        self.request("DELETE", f"/v1/calibration-sets/{set_id}")

    # Builds and other jobs -----------------------------------------------------------------------

    def with_full_ids(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``body`` with short model / calibration set ids expanded by the server's lookups.

        Path parameters take short ids on the server itself; ids inside a request body name the
        engine's cache key, so they are sent in full.
        """
        full = dict(body)
        if isinstance(full.get("model_id"), str):
            full["model_id"] = self.model(full["model_id"])["id"]
        for field in ("calibration_set_id", "eval_set_id"):
            if isinstance(full.get(field), str):
                full[field] = self.calibration_set(full[field])["id"]
        return full

    def create_build(self, body: Mapping[str, Any]) -> BuildTicket:
        answer = self.json("POST", "/v1/builds", json=self.with_full_ids(body))
        return BuildTicket(
            cache="hit" if answer.get("cache") == "hit" else "miss",
            engine_id=str(answer["engine_id"]) if answer.get("engine_id") else None,
            job_id=answer.get("id"),
            joined_existing=bool(answer.get("joined_existing")),
            precision_choice=answer.get("precision_choice"),
        )

    def list_jobs(self, kind: JobKind, *, limit: int = 50) -> list[JobState]:
        documents = self.json("GET", JOB_COLLECTIONS[kind], params={"limit": limit})
        return [JobState.from_document(document, kind=kind) for document in documents]

    def job(self, kind: JobKind, job_id: str) -> JobState:
        document = self.json("GET", f"{JOB_COLLECTIONS[kind]}/{job_id}")
        return JobState.from_document(dict(document), kind=kind, job_id=job_id)

    def cancel_job(self, kind: JobKind, job_id: str) -> JobState:
        document = self.json("DELETE", f"{JOB_COLLECTIONS[kind]}/{job_id}")
        return JobState.from_document(dict(document), kind=kind, job_id=job_id)

    def create_quantization(self, body: Mapping[str, Any]) -> JobState:
        document = self.json("POST", "/v1/quantizations", json=self.with_full_ids(body))
        return JobState.from_document(dict(document), kind="quantization")

    # Engines -------------------------------------------------------------------------------------

    def list_engines(self, *, model_id: str | None = None) -> list[Document]:
        params = {"model_id": self.model(model_id)["id"]} if model_id else None
        return list(self.json("GET", "/v1/engines", params=params))

    def engine(self, engine_id: str) -> Document:
        return dict(self.json("GET", f"/v1/engines/{engine_id}"))

    def engine_layers(self, engine_id: str) -> Document:
        return dict(self.json("GET", f"/v1/engines/{engine_id}/layers"))

    def engine_fusions(self, engine_id: str) -> Document:
        return dict(self.json("GET", f"/v1/engines/{engine_id}/fusions"))

    def delete_engine(self, engine_id: str) -> None:
        self.request("DELETE", f"/v1/engines/{engine_id}")

    def infer(self, engine_id: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on ``inputs`` (sent and answered as npz, so dtypes travel exactly)."""
        import numpy as np

        buffer = io.BytesIO()
        np.savez(
            buffer,
            allow_pickle=False,
            **{name: np.ascontiguousarray(array) for name, array in inputs.items()},
        )
        response = self.request(
            "POST",
            f"/v1/engines/{engine_id}/infer",
            content=buffer.getvalue(),
            headers={"Content-Type": NPZ_MEDIA, "Accept": NPZ_MEDIA},
        )
        with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}

    def start_benchmark(self, engine_id: str, config: Mapping[str, Any]) -> JobState:
        document = self.json("POST", f"/v1/engines/{engine_id}/benchmark", json=dict(config))
        return JobState.from_document(dict(document), kind="report")

    def start_evaluation(self, engine_id: str, eval_set_id: str, max_samples: int | None) -> JobState:
        body = {"eval_set_id": eval_set_id, "max_samples": max_samples}
        document = self.json("POST", f"/v1/engines/{engine_id}/evaluate", json=body)
        return JobState.from_document(dict(document), kind="report")

    def start_comparison(
        self, engine_ids: Sequence[str], config: Mapping[str, Any], eval_set_id: str | None
    ) -> JobState:
        body = {"engine_ids": list(engine_ids), **config, "eval_set_id": eval_set_id}
        document = self.json("POST", "/v1/reports/comparison", json=body)
        return JobState.from_document(dict(document), kind="report")

    # Downloads -----------------------------------------------------------------------------------

    def download(self, path: str, destination: Path | None, *, default_name: str) -> DownloadedFile:
        """Stream ``path`` to ``destination`` (a file, a directory, or None for the current directory)."""
        with self._stream(path) as response:
            expected = response.headers.get("x-content-sha256")
            name = filename_from_disposition(response.headers.get("content-disposition")) or default_name
            if destination is None:
                target = Path.cwd() / name
            elif destination.is_dir():
                target = destination / name
            else:
                target = destination

            def check(actual: str, size: int) -> None:
                if expected and actual != expected.strip().lower():
                    raise DownloadDamaged(
                        f"The download of {path} is corrupt: its sha256 is {actual} but the server "
                        f"sent X-Content-SHA256 {expected}. Nothing was written; try again."
                    )

            written = write_verified(response.iter_bytes(CHUNK_BYTES), target, check)
        return DownloadedFile(
            path=target, sha256=written.sha256, size_bytes=written.size_bytes, verified=bool(expected)
        )
