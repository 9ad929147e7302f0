"""API-key authentication and per-key upload limits at the HTTP edge.

Contract:

- :class:`ApiKeyMiddleware` runs before routing, so every route (including routers added later, the
  OpenAPI schema and ``/docs``) is covered without each router opting in. With
  ``Settings.auth_enabled`` it answers 401 to a request without an accepted key, except on
  :data:`PUBLIC_PATHS`, before anything reads the request body. The key is taken from ``X-API-Key`` or
  ``Authorization: Bearer``.
- WebSocket connections are held to the same rule: without an accepted key they are closed (code 1008)
  before the route sees them.
- ``/healthz`` and ``/readyz`` stay open: orchestrators probe them without credentials. Without an
  accepted key they reveal only liveness and ready / not ready; ``/readyz`` adds its details (storage,
  backends, versions, devices) for a request with an accepted key. ``/docs``, ``/openapi.json`` and
  ``/metrics`` are protected (fetch the schema and scrape with the key; Prometheus sends it with
  ``authorization: {credentials: <key>}``).
- The authenticated :class:`~service.auth.keys.ApiKey` is ``request.state.api_key`` and its id
  ``request.state.api_key_id`` (both None when auth is off); routers pass that id as the job ``owner``
  (:func:`current_key_id` here, or ``service.api.deps.current_owner``).
- Upload limit: a key's ``max_upload_bytes`` replaces the global ``Settings.max_upload_bytes`` for that
  key, higher or lower (an operator can give a CI key room for large detectors, or a shared key less).
  The middleware holds every request body to that limit while it streams (a multipart body gets
  :data:`~service.api.uploads.MULTIPART_OVERHEAD` extra for its form framing) and answers 413 as soon as
  it is passed; upload handlers pass :func:`effective_upload_limit` to ``receive_upload`` so the file
  itself is held to the exact same number.
- Paths under :data:`WORKER_PATH_PREFIX` are for remote build workers only: they need the worker token
  (``Settings.worker_token``) in ``X-Worker-Token`` instead of an API key, answer 404 on a server
  without one, and are held to ``Settings.max_worker_upload_bytes`` (a worker uploads whole engines).
  API keys do not open them, and the worker token opens nothing else.
- :func:`install_openapi_security` declares the ``X-API-Key`` and bearer schemes in the OpenAPI schema
  when auth is on, with ``security: []`` on the public paths.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import anyio.to_thread
from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.uploads import MULTIPART_OVERHEAD
from service.auth.keys import ApiKey, KeyRing
from service.config import Settings
from service.errors import NotFound, ServiceError, TooLarge, Unauthorized
from service.observability.logging import bind_key_id
from service.remote.protocol import WORKER_PATH_PREFIX, WORKER_TOKEN_HEADER

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
API_KEY_HEADER = "X-API-Key"
# The internal API remote build workers call (service.api.workers) has its own secret and upload limit;
# its path prefix and token header live in service.remote.protocol, shared with the workers' client.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
    "BearerAuth": {"type": "http", "scheme": "bearer"},
}


def presented_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: ``X-API-Key`` first, else an ``Authorization: Bearer`` credential."""
    bearer: str | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"x-api-key":
            return value.decode("latin-1").strip() or None
        if lowered == b"authorization":
            scheme, _, credential = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                bearer = credential.strip()
    return bearer


def route_path(scope: Scope) -> str:
    """The request path without the ``root_path`` a reverse proxy mounted the service under."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _header(scope: Scope, wanted: bytes) -> str | None:
    for name, value in scope.get("headers", []):
        if name.lower() == wanted:
            return str(value.decode("latin-1"))
    return None


def _too_large(key: ApiKey | None, limit: int) -> TooLarge:
    if key is not None and key.max_upload_bytes is not None:
        return TooLarge(
            f"The request body exceeds the upload limit of {limit} bytes for API key '{key.name}'; "
            "send a smaller file or ask the operator to raise the key's max_upload_bytes."
        )
    return TooLarge(
        f"The request body exceeds the upload limit of {limit} bytes; "
        "send a smaller file or raise ENGINE_SERVICE_MAX_UPLOAD_BYTES."
    )


async def _send_error(send: Send, error: ServiceError, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": error.to_dict()}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _limited_receive(receive: Receive, limit: int, error: Callable[[], TooLarge]) -> Receive:
    """Wrap ``receive`` so that reading past ``limit`` body bytes raises TooLarge (mapped to 413)."""
    received = 0

    async def receive_within_limit() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise error()
        return message

    return receive_within_limit


async def _authenticate(scope: Scope) -> ApiKey:
    services = getattr(scope["app"].state, "services", None)
    if services is None:  # fail closed: without the lifespan there is no key ring to check against
        raise ServiceError("Authentication is on but the service has not started (it runs in the lifespan).")
    keys: KeyRing = services.keys
    # One indexed SQLite lookup; off the event loop because a job may hold the database lock.
    return await anyio.to_thread.run_sync(keys.authenticate, presented_token(scope.get("headers", [])))


class ApiKeyMiddleware:
    """Authenticate the request (when auth is on) and hold its body to the key's upload limit."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        if route_path(scope).startswith(WORKER_PATH_PREFIX):
            await self._worker(scope, receive, send, state)
            return
        key: ApiKey | None = None
        if self.settings.auth_enabled and route_path(scope) not in PUBLIC_PATHS:
            try:
                key = await _authenticate(scope)
            except Unauthorized as exc:
                await _send_error(send, exc, [(b"www-authenticate", b'Bearer realm="engine-service"')])
                return
            except ServiceError as exc:
                await _send_error(send, exc)
                return
            bind_key_id(key.id)
        elif self.settings.auth_enabled and presented_token(scope.get("headers", [])) is not None:
            # A public path with a key: an accepted one unlocks the details (/readyz), any other is
            # answered as if none was sent.
            try:
                key = await _authenticate(scope)
            except ServiceError:
                key = None
        state["api_key"] = key
        state["api_key_id"] = key.id if key is not None else None  # read by deps.current_owner
        limit = key.upload_limit(self.settings.max_upload_bytes) if key else self.settings.max_upload_bytes
        state["upload_limit"] = limit
        await self._within_limit(scope, receive, send, limit, lambda: _too_large(key, limit))

    async def _within_limit(
        self, scope: Scope, receive: Receive, send: Send, limit: int, too_large: Callable[[], TooLarge]
    ) -> None:
        """Pass the request on with its body held to ``limit`` (plus form framing for multipart)."""
        content_type = _header(scope, b"content-type") or ""
        body_limit = limit + (MULTIPART_OVERHEAD if content_type.startswith("multipart/") else 0)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            await _send_error(send, too_large())
            return
        await self.app(scope, _limited_receive(receive, body_limit, too_large), send)

    async def _worker(self, scope: Scope, receive: Receive, send: Send, state: dict[str, Any]) -> None:
        """Let a remote worker in with the worker token, checked before any of the body is read."""
        expected = self.settings.worker_token_value()
        if expected is None:
            await _send_error(
                send,
                NotFound(
                    "This server takes no remote workers: set ENGINE_SERVICE_WORKER_TOKEN on the server "
                    "and on the workers."
                ),
            )
            return
        presented = _header(scope, WORKER_TOKEN_HEADER.lower().encode()) or ""
        if not hmac.compare_digest(presented.encode(), expected.encode()):
            message = f"A remote worker must send the server's worker token in {WORKER_TOKEN_HEADER}."
            await _send_error(send, Unauthorized(message))
            return
        state["api_key"] = None
        state["api_key_id"] = None
        state["worker"] = True  # checked again by the worker router's dependency
        limit = self.settings.max_worker_upload_bytes

        def too_large() -> TooLarge:
            return TooLarge(
                f"A worker upload may be at most {limit} bytes; raise ENGINE_SERVICE_MAX_WORKER_UPLOAD_BYTES "
                "on the server."
            )

        await self._within_limit(scope, receive, send, limit, too_large)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A future streaming route is covered too: no accepted key, no connection (close code 1008)."""
        key: ApiKey | None = None
        if self.settings.auth_enabled:
            try:
                key = await _authenticate(scope)
            except ServiceError:
                await send({"type": "websocket.close", "code": 1008, "reason": "API key required"})
                return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["api_key"] = key
        state["api_key_id"] = key.id if key is not None else None
        await self.app(scope, receive, send)


def current_key(request: Request) -> ApiKey | None:
    """The authenticated key (None when auth is off or the path is public)."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    return key


def current_key_id(request: Request) -> str | None:
    """The authenticated key's id: the ``owner`` to give ``JobRunner.submit``."""
    key = current_key(request)
    return key.id if key is not None else None


CurrentKey = Annotated[ApiKey | None, Depends(current_key)]
CurrentKeyId = Annotated[str | None, Depends(current_key_id)]


def effective_upload_limit(request: Request, settings: Settings) -> int:
    """The upload limit for this request: the key's own when it has one, else the global one."""
    key = current_key(request)
    return key.upload_limit(settings.max_upload_bytes) if key is not None else settings.max_upload_bytes


_UNAUTHORIZED_RESPONSE: dict[str, Any] = {
    "description": "No API key, or the key was not accepted.",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        "required": ["code", "message"],
                    }
                },
                "required": ["error"],
            }
        }
    },
}


def install_openapi_security(app: FastAPI, settings: Settings) -> None:
    """Declare the API-key schemes in the app's OpenAPI schema (only when auth is on)."""
    if not settings.auth_enabled:
        return
    generate = app.openapi

    def openapi_with_security() -> dict[str, Any]:
        # FastAPI caches the schema and rebuilds it when routes change; the additions below are
        # idempotent, so they are simply applied to whatever it returns.
        schema = generate()
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        schema["security"] = [{name: []} for name in SECURITY_SCHEMES]
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                if not isinstance(operation, dict) or "responses" not in operation:
                    continue
                if path in PUBLIC_PATHS:
                    operation["security"] = []
                else:
                    operation["responses"].setdefault("401", _UNAUTHORIZED_RESPONSE)
        return schema

    app.openapi = openapi_with_security  # type: ignore[method-assign]


def install_auth(app: FastAPI, settings: Settings) -> None:
    """Add the API-key middleware and the OpenAPI security declaration to ``app``."""
    app.add_middleware(ApiKeyMiddleware, settings=settings)
    install_openapi_security(app, settings)
