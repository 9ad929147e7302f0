"""The core both HTTP clients of the service share: the CLI's :mod:`service.cli.client_api` and the
remote worker's :mod:`service.remote.client`.

Contract:

- :func:`error_fields` reads the service's error body (``{"error": {"code", "message"}}``) from any
  answer, or says it is not one; each client turns it into its own error (the CLI's
  :class:`~service.errors.ApiError`, the worker's class for the status).
- :func:`write_verified` is the one atomic file writer of downloads: the bytes go to a temporary file
  beside the destination, hashed and counted as they arrive, synced, and renamed into place only after
  the caller's check of (sha256, size) passed; on any failure the temporary file is removed and
  nothing is left under the destination's name.
- :func:`call_with_retries` retries a call on transient failures with capped exponential backoff
  until a deadline, then raises what ``give_up`` makes of the last failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK_BYTES = 1024 * 1024


def error_fields(response: httpx.Response) -> tuple[str, str] | None:
    """(code, message) of the service's error body in ``response``; None when the body is not one."""
    try:
        body: Any = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error.get("code") or "error"), str(error["message"])
    return None


@dataclass(frozen=True)
class WrittenFile:
    """A file :func:`write_verified` put in place: where, its sha256 and its size."""

    path: Path
    sha256: str
    size_bytes: int


def write_verified(
    chunks: Iterable[bytes], destination: Path, check: Callable[[str, int], None] | None = None
) -> WrittenFile:
    """Write ``chunks`` to ``destination`` atomically; ``check(sha256, size)`` may raise to refuse them.

    Only a complete, checked file ever appears under ``destination``; a refused or interrupted write
    leaves nothing behind (the temporary file beside it is removed).
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part"
    )
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        if check is not None:
            check(digest.hexdigest(), size)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return WrittenFile(destination, digest.hexdigest(), size)


def call_with_retries(
    call: Callable[[], T],
    *,
    retry_seconds: float,
    transient: tuple[type[BaseException], ...],
    give_up: Callable[[BaseException], BaseException],
    what: str,
) -> T:
    """``call()``, retried on ``transient`` errors (0.5 s doubling to 10 s) for up to ``retry_seconds``.

    When the next wait would pass the deadline, ``give_up(last_error)`` is raised, chained to it.
    """
    deadline = time.monotonic() + retry_seconds
    delay = 0.5
    while True:
        try:
            return call()
        except transient as exc:
            if time.monotonic() + delay > deadline:
                raise give_up(exc) from exc
            logger.warning("API server unreachable for %s (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
