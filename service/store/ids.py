"""Short ids: the one place where a unique prefix of a stored id is turned into the full id.

Ids are lowercase hex (sha256 digests, engine cache keys, uuid4 hex job ids), 32 to 64 characters; the
CLI prints their first 16. Every store that takes an id from a client (models, calibration sets, jobs,
engines) passes it through :func:`resolve_id` first.

Contract:

- an exact id is returned as it is (one indexed lookup);
- otherwise a string of at least :data:`MIN_PREFIX` hex characters (any case) that starts exactly one
  stored id is expanded to that id;
- a prefix that starts several ids raises :class:`~service.errors.Conflict` (409) listing some of them;
- anything else (too short, not hex, no match) returns None: the caller raises its own NotFound, which
  knows what kind of thing was asked for.
"""

from __future__ import annotations

import re
from typing import Literal

from service.errors import Conflict
from service.store.db import Database

MIN_PREFIX = 8
IdTable = Literal["models", "calibration_sets", "jobs", "engines"]
_HEX = re.compile(r"[0-9a-f]+")
_SHOWN_MATCHES = 5


def resolve_id(db: Database, table: IdTable, token: str, *, noun: str) -> str | None:
    """The full id in ``table`` that ``token`` names exactly or by a unique prefix, else None."""
    if table not in ("models", "calibration_sets", "jobs", "engines"):  # the name goes into SQL
        raise ValueError(f"not an id table: {table}")
    if db.query_one(f"SELECT 1 FROM {table} WHERE id = ?", (token,)) is not None:
        return token
    prefix = token.lower()
    if len(prefix) < MIN_PREFIX or not _HEX.fullmatch(prefix):
        return None
    # Ids are hex, and every hex digit sorts below "g": the range is exactly the ids with this prefix.
    rows = db.query(
        f"SELECT id FROM {table} WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
        (prefix, prefix + "g", _SHOWN_MATCHES + 1),
    )
    if not rows:
        return None
    if len(rows) > 1:
        shown = ", ".join(row["id"] for row in rows[:_SHOWN_MATCHES])
        more = " and more" if len(rows) > _SHOWN_MATCHES else ""
        raise Conflict(
            f"'{token}' is the start of several {noun} ids ({shown}{more}); give more of the id.",
            details={"prefix": token, "matches": [row["id"] for row in rows[:_SHOWN_MATCHES]]},
        )
    return str(rows[0]["id"])
