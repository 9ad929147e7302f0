"""Tenancy: which API key owns which model, calibration set, engine and job.

Contract:

- Ownership is a link table (``ownership``: kind, resource id, owner), not a column on the resource,
  because stored content is shared: the same ONNX bytes uploaded by two keys are one model row and one
  blob, and each key holds its own link to it. A resource goes (row and files) only when its last link
  goes; until then deleting it only drops the caller's link.
- A :class:`Principal` is who asks: an owner id (the API key id, or :data:`LOCAL_OWNER` when auth is off)
  and whether it sees everything (admin keys, and the single local user with auth off).
- :meth:`Ownership.resolve` is the only way the API turns a client's id (full or a unique prefix) into a
  full id: it looks among the principal's own resources only, so an id or a prefix that belongs to
  another key answers exactly like one that does not exist (NotFound), and an ambiguous prefix lists
  only the principal's own ids.
- Each link carries the owner's own name for the resource (the name it uploaded it under), so one key
  never sees the file name another key chose for the same bytes.
- Reports are job rows (kind ``job``); results a job produces (its engine, its Q/DQ model) are linked to
  every owner of the job when it succeeds (:func:`grant_job_results`, called by the job store).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from service.errors import Conflict, NotFound
from service.store.db import Database

LOCAL_OWNER = "local"
ResourceKind = Literal["model", "calibration_set", "engine", "job"]
_TABLES: dict[str, str] = {
    "model": "models",
    "calibration_set": "calibration_sets",
    "engine": "engines",
    "job": "jobs",
}
# Job result fields that name a resource the job made, and the kind of that resource.
RESULT_RESOURCES: dict[str, ResourceKind] = {"engine_id": "engine", "qdq_model_id": "model"}
_GRANT = "INSERT OR IGNORE INTO ownership (kind, resource_id, owner, name, created_at) VALUES (?, ?, ?, ?, ?)"
_MIN_PREFIX = 8
_SHOWN_MATCHES = 5
_HEX = re.compile(r"[0-9a-f]+")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Principal:
    """Who is asking: the owner id new resources are linked to, and whether every resource is visible."""

    owner: str
    admin: bool = False


LOCAL_PRINCIPAL = Principal(owner=LOCAL_OWNER, admin=True)


def result_resources(result: Mapping[str, Any]) -> list[tuple[ResourceKind, str]]:
    """The resources a job result names: its engine, its Q/DQ model, and for a precision "auto" build
    also the INT8 engine whose evidence decided (it was built for the caller too)."""
    found: list[tuple[ResourceKind, str]] = []
    for field, kind in RESULT_RESOURCES.items():
        resource_id = result.get(field)
        if isinstance(resource_id, str):
            found.append((kind, resource_id))
    choice = result.get("precision_choice")
    int8 = choice.get("int8") if isinstance(choice, Mapping) else None
    if isinstance(int8, Mapping) and isinstance(int8.get("engine_id"), str):
        found.append(("engine", int8["engine_id"]))
    return found


def grant_job_results(conn: sqlite3.Connection, job_id: str, result: Mapping[str, Any]) -> None:
    """Link what a succeeded job made to every owner of the job (inside the caller's transaction)."""
    owners = [
        row[0]
        for row in conn.execute(
            "SELECT owner FROM ownership WHERE kind = 'job' AND resource_id = ?", (job_id,)
        )
    ]
    for kind, resource_id in result_resources(result):
        for owner in owners:
            conn.execute(_GRANT, (kind, resource_id, owner, None, _now()))


class Ownership:
    """Links between owners and resources, and the visibility rules built on them."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def grant(self, kind: ResourceKind, resource_id: str, owner: str, *, name: str | None = None) -> bool:
        """Link ``owner`` to a resource under its own ``name`` (None: the record's); True when the link is
        new (the owner did not have it before). An existing link keeps its name."""
        changed = self.db.execute(_GRANT, (kind, resource_id, owner, name, _now()))
        return changed == 1

    def names(self, kind: ResourceKind, principal: Principal) -> dict[str, str]:
        """The principal's own names for its resources (an admin sees the records' names: empty)."""
        if principal.admin:
            return {}
        rows = self.db.query(
            "SELECT resource_id, name FROM ownership WHERE kind = ? AND owner = ? AND name IS NOT NULL",
            (kind, principal.owner),
        )
        return {str(row["resource_id"]): str(row["name"]) for row in rows}

    def name_for(self, kind: ResourceKind, resource_id: str, principal: Principal) -> str | None:
        """The principal's own name for one resource, or None (use the record's)."""
        if principal.admin:
            return None
        row = self.db.query_one(
            "SELECT name FROM ownership WHERE kind = ? AND resource_id = ? AND owner = ?",
            (kind, resource_id, principal.owner),
        )
        return str(row["name"]) if row is not None and row["name"] is not None else None

    def owners(self, kind: ResourceKind, resource_id: str) -> list[str]:
        rows = self.db.query(
            "SELECT owner FROM ownership WHERE kind = ? AND resource_id = ? ORDER BY owner",
            (kind, resource_id),
        )
        return [str(row["owner"]) for row in rows]

    def sees(self, kind: ResourceKind, resource_id: str, principal: Principal) -> bool:
        if principal.admin:
            return True
        row = self.db.query_one(
            "SELECT 1 FROM ownership WHERE kind = ? AND resource_id = ? AND owner = ?",
            (kind, resource_id, principal.owner),
        )
        return row is not None

    def release(self, kind: ResourceKind, resource_id: str, principal: Principal) -> bool:
        """Drop the principal's link (an admin drops every link). True when no owner is left, i.e. the
        resource itself may now go."""
        if principal.admin:
            self.forget(kind, resource_id)
            return True
        with self.db.transaction() as conn:
            conn.execute(
                "DELETE FROM ownership WHERE kind = ? AND resource_id = ? AND owner = ?",
                (kind, resource_id, principal.owner),
            )
            left = conn.execute(
                "SELECT COUNT(*) FROM ownership WHERE kind = ? AND resource_id = ?", (kind, resource_id)
            ).fetchone()[0]
        return int(left) == 0

    def others_hold(self, kind: ResourceKind, resource_id: str, principal: Principal) -> bool:
        """True when an owner other than the principal still links to the resource (never for an admin)."""
        if principal.admin:
            return False
        row = self.db.query_one(
            "SELECT 1 FROM ownership WHERE kind = ? AND resource_id = ? AND owner != ? LIMIT 1",
            (kind, resource_id, principal.owner),
        )
        return row is not None

    def users(self, kind: ResourceKind, resource_id: str) -> list[tuple[ResourceKind, str]]:
        """What keeps a model or set stored besides its owners: engines built from a model, and active
        jobs that name either (the same rule the catalogs' delete enforces)."""
        found: list[tuple[ResourceKind, str]] = []
        if kind == "model":
            rows = self.db.query(
                "SELECT id FROM engines WHERE model_id = ? OR built_model_id = ? ORDER BY id",
                (resource_id, resource_id),
            )
            found += [("engine", str(row["id"])) for row in rows]
        if kind in ("model", "calibration_set"):
            rows = self.db.query(
                "SELECT id FROM jobs WHERE status IN ('queued', 'running') AND params_json LIKE ? "
                "ORDER BY id",
                (f'%"{resource_id}"%',),
            )
            found += [("job", str(row["id"])) for row in rows]
        return found

    def share_all(self, from_owner: str, to_owner: str) -> int:
        """Give ``to_owner`` a link to everything ``from_owner`` holds (e.g. the local owner's data from
        before auth was on, to the key of the person it belongs to); returns how many links are new."""
        with self.db.transaction() as conn:
            changed = conn.execute(
                "INSERT OR IGNORE INTO ownership (kind, resource_id, owner, name, created_at) "
                "SELECT kind, resource_id, ?, name, created_at FROM ownership WHERE owner = ?",
                (to_owner, from_owner),
            ).rowcount
        return int(changed)

    def adopt_recovered(self) -> int:
        """Give the local owner the models re-registered from their files at start-up (source
        ``recovered``) and the calibration sets that have no owner (every set is an upload, so an
        unowned one was recovered too); returns how many links are new."""
        with self.db.transaction() as conn:
            models = conn.execute(
                "INSERT OR IGNORE INTO ownership (kind, resource_id, owner, name, created_at) "
                "SELECT 'model', id, ?, NULL, created_at FROM models WHERE source = 'recovered' "
                "AND id NOT IN (SELECT resource_id FROM ownership WHERE kind = 'model')",
                (LOCAL_OWNER,),
            ).rowcount
            sets = conn.execute(
                "INSERT OR IGNORE INTO ownership (kind, resource_id, owner, name, created_at) "
                "SELECT 'calibration_set', id, ?, NULL, created_at FROM calibration_sets "
                "WHERE id NOT IN (SELECT resource_id FROM ownership WHERE kind = 'calibration_set')",
                (LOCAL_OWNER,),
            ).rowcount
        return int(models) + int(sets)

    def forget(self, kind: ResourceKind, resource_id: str) -> None:
        """Remove every link to a resource that is gone."""
        self.db.execute("DELETE FROM ownership WHERE kind = ? AND resource_id = ?", (kind, resource_id))

    def visible_ids(self, kind: ResourceKind, principal: Principal) -> set[str] | None:
        """The ids the principal may see, or None for "all" (an admin)."""
        if principal.admin:
            return None
        rows = self.db.query(
            "SELECT resource_id FROM ownership WHERE kind = ? AND owner = ?", (kind, principal.owner)
        )
        return {str(row["resource_id"]) for row in rows}

    def resolve(self, kind: ResourceKind, token: str, principal: Principal, *, missing: str) -> str:
        """The full id of a resource the principal sees, named exactly or by a unique prefix.

        Raises NotFound(``missing``) for unknown ids and for other keys' ids alike, and Conflict when a
        prefix starts several of the principal's own ids (only those are listed).
        """
        table = _TABLES[kind]
        if self.sees(kind, token, principal) and self._exists(table, token):
            return token
        prefix = token.lower()
        if len(prefix) >= _MIN_PREFIX and _HEX.fullmatch(prefix):
            matches = self._prefixed(kind, table, prefix, principal)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                shown = ", ".join(matches[:_SHOWN_MATCHES])
                more = " and more" if len(matches) > _SHOWN_MATCHES else ""
                noun = kind.replace("_", " ")
                raise Conflict(
                    f"'{token}' is the start of several {noun} ids ({shown}{more}); give more of the id.",
                    details={"prefix": token, "matches": matches[:_SHOWN_MATCHES]},
                )
        raise NotFound(missing)

    def _exists(self, table: str, resource_id: str) -> bool:
        return self.db.query_one(f"SELECT 1 FROM {table} WHERE id = ?", (resource_id,)) is not None

    def _prefixed(self, kind: str, table: str, prefix: str, principal: Principal) -> list[str]:
        # Ids are hex, and every hex digit sorts below "g": the range is exactly the ids with this prefix.
        params: Sequence[object] = (prefix, prefix + "g")
        if principal.admin:
            sql = f"SELECT id FROM {table} WHERE id >= ? AND id < ?"
        else:
            # A range scan of the link table's primary key (kind, resource_id, ...), not of the
            # resource table: with many keys, the caller's few links are found without a subquery.
            sql = (
                f"SELECT t.id AS id FROM ownership o JOIN {table} t ON t.id = o.resource_id "
                "WHERE o.kind = ? AND o.resource_id >= ? AND o.resource_id < ? AND o.owner = ?"
            )
            params = (kind, *params, principal.owner)
        rows = self.db.query(sql + " ORDER BY id LIMIT ?", (*params, _SHOWN_MATCHES + 1))
        return [str(row["id"]) for row in rows]


def owned_filter(kind: ResourceKind, principal: Principal, column: str = "id") -> tuple[str, tuple[str, ...]]:
    """A SQL condition (and its parameters) keeping only the rows the principal sees."""
    if principal.admin:
        return "1 = 1", ()
    return (
        f"{column} IN (SELECT resource_id FROM ownership WHERE kind = ? AND owner = ?)",
        (kind, principal.owner),
    )
