"""A synchronous httpx client for an ASGI app running in this process (the local mode's transport).

Contract: :func:`in_process_http` starts an event loop thread (an anyio blocking portal), runs the
app's ASGI lifespan startup there (for the service: open storage, start the job runner), and yields
an ``httpx.Client`` whose requests are handed to the app by ``httpx.ASGITransport`` on that loop. On
exit the lifespan shutdown runs and the loop stops. A lifespan startup failure raises
:class:`InProcessStartFailed` with the app's message.

Bodies are buffered whole in both directions (as any in-process transport does), so the client sees
ordinary responses: status, headers and content, with exceptions inside the app answered as 500.
Nothing listens on a port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import httpx
from anyio.from_thread import BlockingPortal, start_blocking_portal

from service.errors import InProcessStartFailed

# Only the local mode imports this module (lazily), so httpx and anyio load at its top.
ASGIApp = Any  # an ASGI 3 callable: (scope, receive, send) -> awaitable


class PortalTransport(httpx.BaseTransport):
    """Hands each request to ``httpx.ASGITransport`` on the portal's event loop and waits for it."""

    def __init__(self, app: ASGIApp, portal: BlockingPortal) -> None:
        self.portal = portal
        self.asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()  # multipart and file bodies are synchronous streams: read them here
        forwarded = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        status, headers, content = self.portal.call(self._send, forwarded)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), request=request)

    async def _send(self, request: httpx.Request) -> tuple[int, httpx.Headers, bytes]:
        response = await self.asgi.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        return response.status_code, response.headers, content


@asynccontextmanager
async def _lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """Run the ASGI lifespan protocol: startup before the body, shutdown after it."""
    to_app_send, to_app_receive = anyio.create_memory_object_stream[dict[str, Any]](2)
    from_app_send, from_app_receive = anyio.create_memory_object_stream[dict[str, Any]](2)
    scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

    async def run_app() -> None:
        try:
            await app(scope, to_app_receive.receive, from_app_send.send)
        except Exception as exc:  # reported to the waiting side below instead of tearing the loop down
            await from_app_send.send(
                {"type": "lifespan.startup.failed", "message": f"{type(exc).__name__}: {exc}"}
            )
        else:
            await from_app_send.send({"type": "app.exited"})

    # Errors are raised after the task group has closed, so callers get them as they are rather than
    # wrapped in an ExceptionGroup.
    failure: BaseException | None = None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run_app)
        await to_app_send.send({"type": "lifespan.startup"})
        started = await from_app_receive.receive()
        if started["type"] != "lifespan.startup.complete":
            reason = started.get("message") or started["type"]
            failure = InProcessStartFailed(f"The in-process service failed to start: {reason}")
            tasks.cancel_scope.cancel()
        else:
            try:
                yield
            except BaseException as exc:  # re-raised below, once the app has shut down
                failure = exc
            await to_app_send.send({"type": "lifespan.shutdown"})
            await from_app_receive.receive()  # shutdown.complete, shutdown.failed or the app's exit
            tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure


@contextmanager
def in_process_http(app: ASGIApp, *, base_url: str, timeout_s: float = 600.0) -> Iterator[httpx.Client]:
    """An httpx.Client bound to ``app`` in this process, its lifespan running (see the module docstring)."""
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(_lifespan(app)):
        transport = PortalTransport(app, portal)
        with httpx.Client(transport=transport, base_url=base_url, timeout=timeout_s) as client:
            yield client
