"""Tenancy at the HTTP edge: resolve a client's id among the caller's own resources, and delete or
cancel what is shared without taking it from its other owners (see service.store.owners)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from service.catalog.calibration_sets import CalibrationSetRecord
from service.catalog.engines import EngineRecord
from service.catalog.models import ModelRecord
from service.errors import Conflict, NotFound
from service.jobs.records import JobRecord
from service.services import Services
from service.store.owners import Principal, ResourceKind

T = TypeVar("T")


def owned_model(services: Services, principal: Principal, model_id: str) -> ModelRecord:
    """The caller's model named by ``model_id`` (full or a unique prefix); 404 for anyone else's."""
    missing = f"No model with id '{model_id}'. List models with GET /v1/models."
    return services.models.get(services.owners.resolve("model", model_id, principal, missing=missing))


def owned_set(services: Services, principal: Principal, set_id: str) -> CalibrationSetRecord:
    missing = f"No calibration set with id '{set_id}'. List them with GET /v1/calibration-sets."
    full_id = services.owners.resolve("calibration_set", set_id, principal, missing=missing)
    return services.calibration_sets.get(full_id)


def owned_engine(services: Services, principal: Principal, engine_id: str) -> EngineRecord:
    missing = f"No engine with id '{engine_id}'. List engines with GET /v1/engines."
    return services.engines.get(services.owners.resolve("engine", engine_id, principal, missing=missing))


def owned_job(services: Services, principal: Principal, job_id: str, *, kind: str | None = None) -> JobRecord:
    what = f"{kind} job" if kind else "job"
    full_id = services.owners.resolve("job", job_id, principal, missing=f"No {what} with id '{job_id}'.")
    return services.jobs.get(full_id, kind=kind)


def visible(
    services: Services,
    principal: Principal,
    kind: ResourceKind,
    records: Iterable[T],
    key: Callable[[T], str],
) -> list[T]:
    """The records the principal sees, in their order."""
    ids = services.owners.visible_ids(kind, principal)
    return [record for record in records if ids is None or key(record) in ids]


def delete_owned(
    services: Services,
    principal: Principal,
    kind: ResourceKind,
    resource_id: str,
    delete: Callable[[str], None],
) -> None:
    """Delete the caller's copy of a resource: only its link while another key still holds it, else the
    resource itself (``delete``, which may refuse with Conflict and then leaves the link too).

    A model or set that only other keys' engines or jobs still use leaves the caller's view and stays
    stored for them; one the caller's own engines or jobs use is a 409 naming those (and only those).
    """
    owners = services.owners
    if owners.others_hold(kind, resource_id, principal):
        owners.release(kind, resource_id, principal)
        return
    if not principal.admin:
        users = owners.users(kind, resource_id)
        own = [
            (user_kind, user_id) for user_kind, user_id in users if owners.sees(user_kind, user_id, principal)
        ]
        if own:
            raise Conflict(_in_use_message(kind, resource_id, own))
        if users:
            owners.release(kind, resource_id, principal)
            return
    delete(resource_id)
    owners.forget(kind, resource_id)


def _in_use_message(kind: ResourceKind, resource_id: str, users: list[tuple[ResourceKind, str]]) -> str:
    engines = [user_id for user_kind, user_id in users if user_kind == "engine"]
    jobs = [user_id for user_kind, user_id in users if user_kind == "job"]
    parts = []
    if engines:
        parts.append(
            f"your engines {', '.join(engines[:5])} (delete them first with DELETE /v1/engines/{{id}})"
        )
    if jobs:
        parts.append(f"your active jobs {', '.join(jobs[:5])} (cancel them or wait)")
    noun = "Model" if kind == "model" else "Calibration set"
    return f"{noun} {resource_id} is used by {' and '.join(parts)}."


def forget_ownerless_models(services: Services, model_ids: Iterable[str]) -> None:
    """Delete models nobody holds any more and nothing uses (left stored for another key's engine that
    is now gone); a model another engine or an active job still uses stays."""
    owners = services.owners
    for model_id in dict.fromkeys(model_ids):
        if owners.owners("model", model_id) or owners.users("model", model_id):
            continue
        try:
            services.models.delete(model_id)
        except (NotFound, Conflict):  # deleted meanwhile, or taken into use meanwhile
            continue


def cancel_owned(services: Services, principal: Principal, record: JobRecord) -> JobRecord:
    """Cancel a job, unless other keys share it (one build asked for by several): then the caller only
    lets go of it, and it runs on for them."""
    if services.owners.others_hold("job", record.id, principal):
        services.owners.release("job", record.id, principal)
        return record
    return services.runner.cancel(record.id, kind=record.kind)


def grant(
    services: Services, principal: Principal, kind: ResourceKind, resource_id: str, *, name: str | None = None
) -> bool:
    """Link the caller to a resource it made, uploaded (under ``name``) or was given from the cache;
    True when the link is new."""
    return services.owners.grant(kind, resource_id, principal.owner, name=name)


def own_name(
    services: Services, principal: Principal, kind: ResourceKind, body: dict[str, Any]
) -> dict[str, Any]:
    """A record's public body with the caller's own name for it (the name it uploaded it under)."""
    name = services.owners.name_for(kind, str(body["id"]), principal)
    return body if name is None else {**body, "name": name}


def own_names(
    services: Services, principal: Principal, kind: ResourceKind, bodies: Iterable[dict[str, Any]]
) -> list[dict[str, Any]]:
    names = services.owners.names(kind, principal)
    return [{**body, "name": names[body["id"]]} if body["id"] in names else body for body in bodies]
