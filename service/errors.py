"""One exception tree for the whole service.

Domain code raises these; ``service.api.errors`` turns them into JSON responses in one place.
Each class carries a stable machine-readable ``code`` and the HTTP status it maps to, so the
domain never imports fastapi and the API never guesses a status from a message.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    code = "service_error"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers the answer carries besides the JSON body (none by default)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadInput(ServiceError):
    """The request or an uploaded file cannot be used as given (HTTP 400)."""

    code = "bad_input"
    status = 400


class InvalidName(BadInput):
    """A name given to a model or calibration set is too long or holds control characters."""

    code = "invalid_name"


class InvalidModel(BadInput):
    """The upload is not a usable ONNX model."""

    code = "invalid_model"


class InvalidCalibrationSet(BadInput):
    """The calibration upload is malformed or does not fit the model."""

    code = "invalid_calibration_set"


class UnsafeArchive(BadInput):
    """An archive member would escape the extraction root or is not a regular file."""

    code = "unsafe_archive"


class InvalidInferenceInput(BadInput):
    """Inference inputs do not match the engine's I/O (names, dtypes, shapes)."""

    code = "invalid_inference_input"


class ModelRunFailed(ServiceError):
    """The model itself failed while running on valid inputs (HTTP 422): an allocation it cannot get,
    a shape its own operators reject. The model's fault, not the server's."""

    code = "model_run_failed"
    status = 422


class NotFound(ServiceError):
    """An id names nothing the service holds (HTTP 404)."""

    code = "not_found"
    status = 404


class Conflict(ServiceError):
    """The request contradicts the current state (HTTP 409)."""

    code = "conflict"
    status = 409


class EngineNotRunnableHere(Conflict):
    """The engine exists but its backend cannot run on this host."""

    code = "engine_not_runnable_here"


class TooLarge(ServiceError):
    """An upload or archive exceeds a configured bound (HTTP 413)."""

    code = "too_large"
    status = 413


class ServerBusy(ServiceError):
    """The server is at a capacity bound right now; the same request can succeed later (HTTP 429).

    429 rather than 503: the server is healthy and shedding load, and a 5xx would read as a fault.
    """

    code = "server_busy"
    status = 429

    def __init__(
        self, message: str, *, retry_after_s: int = 1, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Unauthorized(ServiceError):
    """Missing or unknown API key (HTTP 401)."""

    code = "unauthorized"
    status = 401


class LimitExceeded(ServiceError):
    """A quota (queued or running jobs of one owner) is exhausted (HTTP 429, with Retry-After)."""

    code = "limit_exceeded"
    status = 429

    def __init__(
        self, message: str, *, retry_after_s: int = 10, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class BackendUnavailable(ServiceError):
    """The requested backend cannot be used on this host (HTTP 503)."""

    code = "backend_unavailable"
    status = 503


class BuildFailed(ServiceError):
    """A backend refused or failed to build the engine; the job records it."""

    code = "build_failed"
    status = 500


class JobCancelled(ServiceError):
    """Raised inside a job when its cancellation was requested; the runner records `cancelled`."""

    code = "job_cancelled"
    status = 409
