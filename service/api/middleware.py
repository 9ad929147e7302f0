"""HTTP observability: request ids, the access log, request metrics, and the ``/metrics`` endpoint.

Contract:

- Every HTTP request gets an id: the incoming ``X-Request-ID`` when it is sane (1-128 characters of
  letters, digits and ``._:/+=@-``), otherwise a fresh UUID. It is bound to the logging context for
  the whole request (see :mod:`service.observability.logging`), echoed in the ``X-Request-ID`` response
  header (401, 413 and 500 answers included) and kept as ``request.state.request_id``.
- One access line per request on the ``service.access`` logger: method, path, status, duration,
  request id and key id, also as structured fields for JSON logs.
- Each request is counted and timed in the app's :class:`~service.observability.metrics.ServiceMetrics`
  under its route template; requests that match no route share one ``<unmatched>`` label.
- An exception no handler turned into a response is logged with its request id and answered with a JSON
  500 that carries the id, so a user's report can be matched to the log line.

:class:`ObservabilityMiddleware` must be the outermost of the service's middlewares so that it sees the
answers the authentication middleware gives on its own; :func:`install_observability` adds it last.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.deps import ServicesDep
from service.observability.logging import current_key_id, request_scope
from service.observability.metrics import UNMATCHED_ROUTE

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("service.access")


def request_id_from(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is safe to log and echo, else a new one."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1").strip()
            if _SANE_REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def route_template(scope: Scope) -> str:
    """The template of the route that served (or would serve) the request, for bounded metric labels."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    # Answered before routing (401, early 413): find the route the request was aimed at.
    partial: str | None = None
    for candidate in _leaf_routes(getattr(getattr(scope.get("app"), "router", None), "routes", ())):
        template = getattr(candidate, "path", None)
        if not isinstance(template, str):
            continue
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return template
        if match == Match.PARTIAL and partial is None:
            partial = template  # right path, other method (405)
    return partial or UNMATCHED_ROUTE


def _leaf_routes(routes: Iterable[Any]) -> Iterator[Any]:
    for route in routes:
        # Newer FastAPI keeps an included router as one entry that expands into its routes on demand;
        # older versions copied the routes into the app. Both are walked; an unknown shape is skipped.
        expand = getattr(route, "effective_route_contexts", None)
        if callable(expand):
            yield from expand()
        elif callable(getattr(route, "matches", None)):
            yield route


class ObservabilityMiddleware:
    """Request id, access log line, request metrics, and a JSON 500 for unhandled errors."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                response_started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        started = time.perf_counter()
        with request_scope(request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
                if response_started:
                    raise  # too late to answer; the server closes the connection
                await _send_internal_error(send_with_id, request_id)
            finally:
                self._record(scope, status, time.perf_counter() - started, request_id)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        method = str(scope.get("method", ""))
        path = str(scope.get("path", ""))
        route = route_template(scope)
        services = getattr(scope["app"].state, "services", None)
        if services is not None:
            services.metrics.observe_request(method, route, status, seconds)
        key = scope.get("state", {}).get("api_key")
        key_id = key.id if key is not None else current_key_id()
        client = scope.get("client")
        access_logger.info(
            "%s %s %d %.1fms key=%s",
            method,
            path,
            status,
            seconds * 1000,
            key_id or "-",
            extra={
                "request_id": request_id,
                "key_id": key_id,
                "method": method,
                "path": path,
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                "client": client[0] if client else None,
            },
        )


async def _send_internal_error(send: Send, request_id: str) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "internal_error",
                "message": f"The server failed unexpectedly; report request id {request_id} to the operator.",
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


router = APIRouter(tags=["observability"])

_METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {}}}
}


@router.get("/metrics", response_class=Response, responses=_METRICS_RESPONSES)
def read_metrics(services: ServicesDep) -> Response:
    """Prometheus metrics: requests, latency, jobs, build durations, engine cache, loaded runners."""
    scrape = services.metrics.render()
    return Response(content=scrape.body, media_type=scrape.content_type)


def install_observability(app: FastAPI) -> None:
    """Add the ``/metrics`` route and the observability middleware (call after every other middleware)."""
    app.include_router(router)
    app.add_middleware(ObservabilityMiddleware)
