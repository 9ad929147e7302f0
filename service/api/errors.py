"""The one place where service errors become HTTP responses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import InvalidRequest, ServiceError

logger = logging.getLogger(__name__)


_ERROR_BODY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
            "required": ["code", "message"],
        }
    },
    "required": ["error"],
}
# What each documented status means; every one of them has the body above.
_ERROR_STATUSES = {
    "400": "Bad input: the message says what to change.",
    "404": "An id names nothing the service holds.",
    "409": "The request contradicts the current state.",
    "413": "The upload or archive exceeds a configured bound.",
    "422": "The request does not match the schema.",
    "429": "Busy: as many request bodies held as the server may, or as many queued or running jobs as "
    "this owner may have; retry after Retry-After seconds.",
    "503": "The requested backend cannot be used on this host.",
}


_HTTP_ERROR_CODES = {400: "bad_input", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR_BODY}}}


def document_error_responses(app: FastAPI) -> None:
    """Declare the error answers of every /v1 operation in the OpenAPI schema, with their one shape.

    The handlers below can answer any service route with these statuses; without this the schema
    listed only successes (and FastAPI's own 422 shape, which this service does not use).
    """
    generate = app.openapi

    def openapi_with_errors() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI; the additions are idempotent
        for path, item in schema.get("paths", {}).items():
            if not path.startswith("/v1/"):
                continue
            for operation in item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                for status, description in _ERROR_STATUSES.items():
                    if status == "422":  # replace FastAPI's HTTPValidationError: the handler answers as below
                        operation["responses"][status] = _error_response(description)
                    else:
                        operation["responses"].setdefault(status, _error_response(description))
        return schema

    app.openapi = openapi_with_errors  # type: ignore[method-assign]


def error_response(exc: ServiceError) -> JSONResponse:
    """The one JSON shape of a service error (also used by middlewares that answer themselves)."""
    return JSONResponse(status_code=exc.status, content={"error": exc.to_dict()}, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    document_error_responses(app)

    @app.exception_handler(ServiceError)
    async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Raised by Starlette and FastAPI themselves (unparseable JSON or multipart bodies, unknown
        # paths, wrong methods): answered in the same shape as every other error.
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        body = {"error": {"code": _HTTP_ERROR_CODES.get(exc.status_code, "http_error"), "message": detail}}
        return JSONResponse(status_code=exc.status_code, content=body, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"location": list(err.get("loc", ())), "message": err.get("msg", ""), "type": err.get("type", "")}
            for err in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(map(str, p['location']))}: {p['message']}" for p in problems[:5])
        body = {
            "error": {
                "code": InvalidRequest.code,
                "message": f"The request does not match the schema: {summary}",
                "details": {"problems": problems},
            }
        }
        return JSONResponse(status_code=InvalidRequest.status, content=body)
