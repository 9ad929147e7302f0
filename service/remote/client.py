"""The remote worker's side of the worker API (:mod:`service.api.workers`): typed calls over HTTP.

Contract:

- Every call sends the worker token in ``X-Worker-Token``. Answers outside 2xx raise the service's own
  error class for that status (404 :class:`NotFound`, 409 :class:`Conflict`, ...) with the server's
  message, so a job handler fails with the same words a local build would.
- A server that cannot be reached, or answers 502/503/504 (restarting, behind a proxy), is retried
  with backoff for up to ``retry_seconds``; then :class:`ApiUnreachable` (a BackendUnavailable) is
  raised. Retrying is safe: every call is idempotent on the server or refused there a second time
  (a claim, a finish) with 409, which callers treat as "already done".
- Downloads stream into a temporary file beside the destination and are renamed into place only
  when their size (and, for models, their sha256) is what the server said.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx

from service.errors import ApiUnreachable, DownloadDamaged, NotFound, ServiceError, error_class_for_status
from service.http_client import CHUNK_BYTES, call_with_retries, error_fields, write_verified
from service.remote.protocol import WORKER_ROUTE_PREFIX, WORKER_TOKEN_HEADER

logger = logging.getLogger(__name__)

T = TypeVar("T")
_RETRY_STATUSES = frozenset({502, 503, 504})


def _error_from(response: httpx.Response) -> ServiceError:
    fields = error_fields(response)
    message = fields[1] if fields is not None else (response.text[:500] or response.reason_phrase)
    error = error_class_for_status(response.status_code)
    return error(f"API server: {message} (HTTP {response.status_code})")


class WorkerApi:
    """One remote worker's connection to the API server it builds for."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        retry_seconds: float = 120.0,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry_seconds = retry_seconds
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={WORKER_TOKEN_HEADER: token},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def hello(self) -> dict[str, Any]:
        """The server's version and preparation version; raises Unauthorized for a wrong token."""
        return self._json("GET", f"{WORKER_ROUTE_PREFIX}/hello")

    # -- jobs -----------------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}")

    def claim(self, job_id: str, claimant: str) -> dict[str, Any]:
        """Take a queued job; retried safely, since the server answers the same claimant again."""
        return self._json("POST", f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}/claim", json={"claimant": claimant})

    def progress(self, job_id: str, progress: float, phase: str | None) -> bool:
        """Record progress; returns whether cancellation was requested."""
        body = self._json(
            "POST",
            f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}/progress",
            json={"progress": progress, "phase": phase},
        )
        return bool(body["cancel_requested"])

    def heartbeat(self, job_id: str) -> bool:
        """Renew the job's lease; returns whether cancellation was requested (409 once it ended)."""
        return bool(self._json("POST", f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}/heartbeat")["cancel_requested"])

    def append_log(self, job_id: str, text: str) -> bool:
        body = self._json("POST", f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}/log", json={"text": text})
        return bool(body["cancel_requested"])

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._json("GET", f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}/cancel")["cancel_requested"])

    def finish(
        self, job_id: str, status: str, *, result: Mapping[str, Any] | None, error: str | None
    ) -> dict[str, Any]:
        body = {"status": status, "result": dict(result) if result is not None else None, "error": error}
        return self._json("POST", f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}/finish", json=body)

    # -- inputs and outputs ---------------------------------------------------------------------

    def cached_engine_id(self, key_digest: str) -> str | None:
        try:
            return str(self._json("GET", f"{WORKER_ROUTE_PREFIX}/engines/{key_digest}")["engine_id"])
        except NotFound:
            return None

    def download_model(self, model_id: str, destination: Path) -> None:
        """Fetch a model's bytes; the model id is their sha256, so the copy is checked against it."""
        self._download(f"{WORKER_ROUTE_PREFIX}/models/{model_id}", destination, sha256=model_id)

    def calibration_files(self, set_id: str) -> list[tuple[str, int]]:
        body = self._json("GET", f"{WORKER_ROUTE_PREFIX}/calibration-sets/{set_id}")
        return [(str(f["name"]), int(f["size_bytes"])) for f in body["files"]]

    def download_calibration_file(self, set_id: str, name: str, size: int, destination: Path) -> None:
        self._download(
            f"{WORKER_ROUTE_PREFIX}/calibration-sets/{set_id}/files/{name}", destination, size=size
        )

    def upload_engine(
        self,
        job_id: str,
        metadata: Mapping[str, Any],
        *,
        built_model: bytes,
        engine: bytes,
        calibration_cache: bytes | None,
    ) -> dict[str, Any]:
        files: dict[str, tuple[str, bytes, str]] = {
            "built_model": ("model.onnx", built_model, "application/octet-stream"),
            "engine": ("engine", engine, "application/octet-stream"),
        }
        if calibration_cache is not None:
            files["calibration_cache"] = ("calibration.cache", calibration_cache, "application/octet-stream")
        return self._json(
            "POST",
            f"{WORKER_ROUTE_PREFIX}/jobs/{job_id}/engine",
            data={"metadata": json.dumps(dict(metadata))},
            files=files,
            timeout=httpx.Timeout(600.0, connect=10.0),
        )

    # -- transport ------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        def send() -> dict[str, Any]:
            response = self._http.request(method, path, **kwargs)
            self._raise_for(response)
            body: dict[str, Any] = response.json()
            return body

        return self._retrying(send, f"{method} {path}")

    def _download(
        self, path: str, destination: Path, *, size: int | None = None, sha256: str | None = None
    ) -> None:
        def check(actual_sha256: str, received: int) -> None:
            if size is not None and received != size:
                raise DownloadDamaged(f"{path}: received {received} bytes, expected {size}.")
            if sha256 is not None and actual_sha256 != sha256:
                raise DownloadDamaged(f"{path}: the bytes hash to {actual_sha256}, expected {sha256}.")

        def fetch() -> None:
            with self._http.stream("GET", path) as response:
                self._raise_for(response)
                write_verified(response.iter_bytes(CHUNK_BYTES), destination, check)

        self._retrying(fetch, f"GET {path}")

    def _raise_for(self, response: httpx.Response) -> None:
        if response.is_success:
            return
        if response.status_code in _RETRY_STATUSES:
            raise _Transient(f"HTTP {response.status_code}")
        response.read()
        raise _error_from(response)

    def _retrying(self, call: Callable[[], T], what: str) -> T:
        def give_up(exc: BaseException) -> ApiUnreachable:
            return ApiUnreachable(
                f"The API server at {self.base_url} did not answer {what} for "
                f"{self.retry_seconds:.0f} s ({exc}); check ENGINE_SERVICE_API_URL and that it runs."
            )

        return call_with_retries(
            call,
            retry_seconds=self.retry_seconds,
            transient=(httpx.TransportError, _Transient),
            give_up=give_up,
            what=what,
        )


class _Transient(Exception):
    """A gateway or restart answer worth retrying."""
