"""Structured logs that carry the request id and the API key id of the request that caused them.

Contract:

- :func:`request_scope` binds a request id (and later, with :func:`bind_key_id`, the caller's key id)
  to the current context; every log record emitted inside it, in this task or in a thread started with
  a copy of the context (FastAPI's threadpool does this), gets ``request_id`` and ``key_id`` attributes
  through :class:`RequestContextFilter`. Outside a request both are ``"-"``.
- :func:`configure_logging` is called once at app start-up (never at import). It installs one handler
  on the root logger: JSON lines (:class:`JsonFormatter`) or a plain single-line format, at the
  configured level, on stderr or, with ``file``, appended to that file. Calling it again replaces that
  handler rather than adding a second one. It also
  routes uvicorn's own server messages through the same handler, so every line has one format, and
  turns off uvicorn's access log, which the service's access line (logger ``service.access``) replaces.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

_request_id: ContextVar[str | None] = ContextVar("engine_service_request_id", default=None)
_key_id: ContextVar[str | None] = ContextVar("engine_service_key_id", default=None)

PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"
_HANDLER_MARK = "_engine_service_handler"
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and goes into JSON.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "key_id",
    "taskName",
}


def current_request_id() -> str | None:
    return _request_id.get()


def current_key_id() -> str | None:
    return _key_id.get()


@contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Bind ``request_id`` (and a fresh, empty key id) for the duration of one request."""
    request_token = _request_id.set(request_id)
    key_token = _key_id.set(None)
    try:
        yield
    finally:
        _key_id.reset(key_token)
        _request_id.reset(request_token)


def bind_key_id(key_id: str | None) -> None:
    """Record which API key the current request authenticated with (inside :func:`request_scope`)."""
    _key_id.set(key_id)


class RequestContextFilter(logging.Filter):
    """Adds ``request_id`` and ``key_id`` to each record; values passed with ``extra=`` win."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get() or "-"
        if not hasattr(record, "key_id"):
            record.key_id = _key_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request and key ids, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or _request_id.get(),
            "key_id": getattr(record, "key_id", None) or _key_id.get(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD_ATTRS and not name.startswith("_"):
                body[name] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            body["stack"] = self.formatStack(record.stack_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (test runners and daemons swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # always the current sys.stderr


def parse_level(level: str) -> int:
    """A logging level from its name ('info', 'DEBUG'...); raises ValueError naming the valid ones."""
    value = logging.getLevelName(level.strip().upper())
    if not isinstance(value, int):
        raise ValueError(
            f"Unknown log level '{level}'; use one of DEBUG, INFO, WARNING, ERROR, CRITICAL "
            "(ENGINE_SERVICE_LOG_LEVEL)."
        )
    return value


def configure_logging(level: str, *, json_lines: bool, file: Path | None = None) -> logging.Handler:
    """Install the service's log handler on the root logger (idempotent); returns the handler.

    The handler writes to the current ``sys.stderr``, or appends to ``file`` when one is given.
    """
    numeric_level = parse_level(level)
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
            existing.close()
    handler: logging.Handler
    if file is None:
        handler = _StderrHandler()
    else:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(numeric_level)
    _adopt_uvicorn_loggers()
    return handler


def _adopt_uvicorn_loggers() -> None:
    server = logging.getLogger("uvicorn")
    server.handlers.clear()
    server.propagate = True
    # The service writes its own access line with request id, key id and duration; uvicorn's would repeat it.
    logging.getLogger("uvicorn.access").disabled = True
