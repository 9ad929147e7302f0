"""The one timestamp format of stored records: UTC, ISO 8601, milliseconds (sorts as text)."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> str:
    """Now, as every row of the metadata database records it (``2026-01-31T12:00:00.123+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")
