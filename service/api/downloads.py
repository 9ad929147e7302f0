"""File downloads with a bounded, header-safe ``Content-Disposition``.

The suggested file name often comes from a user (a model's name), so it is never copied into the
header as is: RFC 6266 asks for an ASCII ``filename`` fallback plus the exact name as RFC 5987
``filename*`` (UTF-8, percent-encoded), which leaves no quote, semicolon or line break to inject,
and both are cut to a bounded length that keeps the extension.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

MAX_FILENAME_CHARS = 120
_UNSAFE_ASCII = re.compile(r"[^A-Za-z0-9._-]+")


def _bounded(name: str, limit: int) -> str:
    """``name`` cut to ``limit`` characters, keeping a short extension at the end."""
    if len(name) <= limit:
        return name
    stem, dot, extension = name.rpartition(".")
    if dot and stem and len(extension) <= 16:
        return f"{stem[: limit - len(extension) - 1]}.{extension}"
    return name[:limit]


def content_disposition(filename: str, *, default: str = "download") -> str:
    """An ``attachment`` header value: an ASCII fallback and the exact name as ``filename*``."""
    # Control characters never belong in a suggested name, path separators neither.
    visible = "".join(char for char in filename if not unicodedata.category(char).startswith("C"))
    cleaned = visible.replace("/", "_").replace("\\", "_").strip()
    cleaned = _bounded(cleaned or default, MAX_FILENAME_CHARS)
    ascii_only = unicodedata.normalize("NFKD", cleaned).encode("ascii", "ignore").decode("ascii")
    fallback = _UNSAFE_ASCII.sub("_", ascii_only).strip("._") or default
    value = f'attachment; filename="{_bounded(fallback, MAX_FILENAME_CHARS)}"'
    if cleaned != fallback:
        value += f"; filename*=UTF-8''{quote(cleaned, safe='')}"
    return value


def file_download(
    path: Path,
    *,
    media_type: str,
    filename: str,
    headers: Mapping[str, str] | None = None,
    background: BackgroundTask | None = None,
) -> FileResponse:
    """A FileResponse whose suggested name is made safe by :func:`content_disposition`."""
    return FileResponse(
        path,
        media_type=media_type,
        headers={**(headers or {}), "Content-Disposition": content_disposition(filename)},
        background=background,
    )
