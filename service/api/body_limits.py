"""Bounds on request bodies the server holds in memory: per body, and all of them together.

Uploads (models, calibration sets, remote workers' results) stream to disk and pass untouched;
/infer reads its own body under the shared budget (its limits depend on the format). Every other
body is JSON for a pydantic model: this middleware reads it here, refusing it past
``max_json_body_bytes`` (413) or when the shared :class:`BodyBudget` stays spent (429, Retry-After),
before FastAPI parses it, then hands the buffered body on.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.config import Settings
from service.errors import ServiceError, TooLarge
from service.serving.body_budget import BodyBudget, BodyLease

# Parsed JSON holds about ten times its bytes as Python objects; decoded binary tensors about twice.
JSON_DECODE_FACTOR = 10
BINARY_DECODE_FACTOR = 2
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_STREAMED_UPLOADS = frozenset({"/v1/models", "/v1/calibration-sets"})


def reads_its_own_body(method: str, path: str) -> bool:
    """Routes that stream their body to disk or bound it themselves."""
    path = path.rstrip("/")
    return (
        method not in _BODY_METHODS
        or path in _STREAMED_UPLOADS
        or path.startswith("/v1/worker/")
        or path.endswith("/infer")
    )


def declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


class BodyLimitMiddleware:
    """Buffers the JSON body of a non-streaming route within its cap and the shared budget."""

    def __init__(self, app: ASGIApp, *, budget: BodyBudget, max_json_body_bytes: int) -> None:
        self.app = app
        self.budget = budget
        self.max_bytes = max_json_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or reads_its_own_body(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        with self.budget.lease() as lease:
            try:
                body = await self._read(scope, receive, lease)
            except ServiceError as exc:
                await error_response(exc)(scope, receive, send)
                return
            delivered = False

            async def replay() -> Message:
                nonlocal delivered
                if delivered:
                    return await receive()  # after the body: disconnect notices
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}

            await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive, lease: BodyLease) -> bytes:
        declared = declared_length(scope)
        if declared is not None:
            self._check_size(declared)
            await lease.ensure(declared * JSON_DECODE_FACTOR)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees an empty body and its own disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            self._check_size(size)
            await lease.ensure(size * JSON_DECODE_FACTOR)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise TooLarge(
                f"The request body is {size} bytes or more; a JSON request to this route may hold "
                f"{self.max_bytes} (ENGINE_SERVICE_MAX_JSON_BODY_BYTES). Uploads go to /v1/models or "
                "/v1/calibration-sets as files.",
                details={"limit": "max_json_body_bytes", "max": self.max_bytes},
            )


def install_body_limits(app: FastAPI, settings: Settings) -> None:
    """Share one body budget between this middleware and /infer (``app.state.body_budget``)."""
    budget = BodyBudget(settings.max_inflight_body_bytes, wait_s=settings.inflight_body_wait_s)
    app.state.body_budget = budget
    app.add_middleware(
        BodyLimitMiddleware,  # type: ignore[arg-type]
        budget=budget,
        max_json_body_bytes=settings.max_json_body_bytes,
    )
