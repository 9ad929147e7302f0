"""One exception tree for the whole service.

Domain code raises these; ``service.api.errors`` turns them into JSON responses in one place.
Each class carries a stable machine-readable ``code`` and the HTTP status it maps to, so the
domain never imports fastapi and the API never guesses a status from a message. The way back is
derived from the same classes: :func:`error_class_for_status` is the class a client of the API (the
remote worker) raises for an error answer. The command line's own errors (a server that does not
answer, an error answer, a job that failed) are in the same tree, each with the process exit code
the CLI ends with.
"""

from __future__ import annotations

from functools import cache
from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    code = "service_error"
    status = 500
    exit_code = 1  # what the command line exits with when this error ends a command

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


class InvalidRequest(BadInput):
    """The request does not match the route's schema (HTTP 422; FastAPI's validation, answered in the
    service's own error shape)."""

    code = "invalid_request"
    status = 422


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


class BackendUnavailable(ServiceError):
    """The requested backend cannot be used on this host (HTTP 503)."""

    code = "backend_unavailable"
    status = 503


class BuildFailed(ServiceError):
    """A backend refused or failed to build the engine; the job records it."""

    code = "build_failed"
    status = 500


class InvalidJobParams(ServiceError):
    """A stored job's params are not what its kind reads (garbled, or written by an unknown version):
    the job fails with this message instead of a KeyError deep inside its handler."""

    code = "invalid_job_params"
    status = 500


class JobCancelled(ServiceError):
    """Raised inside a job when its cancellation was requested; the runner records `cancelled`."""

    code = "job_cancelled"
    status = 409


class SchemaTooNew(ServiceError):
    """The database was written by a newer version of the service."""

    code = "schema_too_new"


class CorruptBlob(ServiceError):
    """A stored file does not match its digest (damaged or partially written by something else)."""

    code = "corrupt_blob"


class DownloadDamaged(ServiceError):
    """Downloaded bytes are not what the server said they are (size or sha256); nothing was kept."""

    code = "download_damaged"
    exit_code = 4


class ApiUnreachable(BackendUnavailable):
    """The API server did not answer within the retry window (a remote worker's view)."""

    code = "api_unreachable"


# The command line's side: talking to a server, following its jobs. ------------------------------


class ClientError(ServiceError):
    """Base of the errors the CLI reports as a client of a server; ``message`` is what a person reads."""

    code = "client_error"


class ApiError(ClientError):
    """The server answered with an error status; ``status`` and ``code`` are the server's."""

    code = "api_error"  # replaced by the server's own code on each instance

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ServerUnreachable(ClientError):
    """No answer from the server at all (refused, unresolvable, timed out)."""

    code = "server_unreachable"
    exit_code = 3


class InProcessStartFailed(ClientError):
    """The app's lifespan startup failed, so the in-process service (local mode) never started."""

    code = "in_process_start_failed"


class JobUnsuccessful(ClientError):
    """The job ended failed or cancelled; ``state`` is its last poll (a ``client_api.JobState``)."""

    code = "job_unsuccessful"

    def __init__(self, message: str, state: Any) -> None:
        super().__init__(message)
        self.state = state


class JobInterrupted(ClientError):
    """Ctrl-C while following a job: it was cancelled, or left running (detached)."""

    code = "job_interrupted"
    exit_code = 130

    def __init__(self, message: str, *, cancelled: bool) -> None:
        super().__init__(message)
        self.cancelled = cancelled


def _tree(root: type[ServiceError]) -> list[type[ServiceError]]:
    """``root`` and every subclass, parents before children, siblings in the order they are defined."""
    order = [root]
    for child in root.__subclasses__():
        order.extend(_tree(child))
    return order


@cache
def _status_classes() -> dict[int, type[ServiceError]]:
    classes: dict[int, type[ServiceError]] = {}
    for error in _tree(ServiceError):
        if not issubclass(error, ClientError):  # the CLI's own errors are never answered by a server
            classes.setdefault(error.status, error)
    return classes


def error_class_for_status(status: int) -> type[ServiceError]:
    """The class an error answer with HTTP ``status`` stands for: the first class of this module (in the
    order above, parents first) that maps to it: 400 BadInput, 422 InvalidRequest, 409 Conflict, 429
    LimitExceeded (as remote workers have always read it; ServerBusy is defined after it)...;
    :class:`ServiceError` for a status no class maps to."""
    return _status_classes().get(status, ServiceError)
