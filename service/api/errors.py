"""The one place where service errors become HTTP responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.errors import ServiceError

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
        return JSONResponse(status_code=exc.status, content={"error": exc.to_dict()})

    @app.exception_handler(RequestValidationError)
    async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"location": list(err.get("loc", ())), "message": err.get("msg", ""), "type": err.get("type", "")}
            for err in exc.errors()
        ]
        summary = "; ".join(f"{'.'.join(map(str, p['location']))}: {p['message']}" for p in problems[:5])
        body = {
            "error": {
                "code": "invalid_request",
                "message": f"The request does not match the schema: {summary}",
                "details": {"problems": problems},
            }
        }
        return JSONResponse(status_code=422, content=body)
