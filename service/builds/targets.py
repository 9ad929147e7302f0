"""Which machine identity a build is for: this host's backend, or one a live worker advertises.

An engine is built for one backend version on one device, so the API server must name that target
before it queues the build (it is part of the engine key). The candidates are this host's own backend
(when it can build) and the targets that live workers serve (a GPU host's ``tensorrt``, say, which a
CPU-only API host cannot build itself). One candidate is taken as it is; among several, the request's
``device`` selector must pick exactly one.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.backends.base import Availability, Backend, BackendInfo
from service.errors import BackendUnavailable, BadInput
from service.jobs.runner import JobTarget


def _identity(info: BackendInfo) -> tuple[str, str, str, str | None]:
    return info.name, info.version, info.device, info.compute_capability


def _describe(info: BackendInfo) -> str:
    capability = f", {info.compute_capability}" if info.compute_capability else ""
    return f"{info.name} {info.version} on {info.device}{capability}"


def worker_infos(worker_targets: Sequence[JobTarget]) -> list[BackendInfo]:
    """The identities live workers build for. Only the identity matters on this side: it goes into the
    engine key; the worker describes the rest of its backend itself."""
    return [
        BackendInfo(target.backend, target.version, target.device, target.compute_capability)
        for target in worker_targets
        if target.backend is not None and target.version is not None and target.device is not None
    ]


def matches(info: BackendInfo, selector: str) -> bool:
    """A ``device`` selector matches a compute capability exactly or the device description in part."""
    wanted = selector.strip().lower()
    capability = (info.compute_capability or "").lower()
    return bool(wanted) and (wanted == capability or wanted in info.device.lower())


def build_target(
    backend: Backend, worker_targets: Sequence[JobTarget], *, device: str | None = None
) -> BackendInfo:
    """The one target to build ``backend``'s engine for, or a 400/503 that says what to do."""
    candidates: dict[tuple[str, str, str, str | None], BackendInfo] = {}
    availability = backend.available()
    if availability.can_build:
        local = backend.describe()
        candidates[_identity(local)] = local
    for info in worker_infos(worker_targets):
        if info.name == backend.name:
            candidates.setdefault(_identity(info), info)
    if not candidates:
        live = sorted({t.backend for t in worker_targets if t.backend})
        workers = f"live workers build {', '.join(live)}" if live else "no live worker builds anything"
        raise BackendUnavailable(
            f"Backend '{backend.name}' cannot build here ({availability.reason}) and {workers}; "
            f"start an `engine-service worker` on a host that can build {backend.name}."
        )
    options = list(candidates.values())
    if device is not None:
        chosen = [info for info in options if matches(info, device)]
        if not chosen:
            raise BadInput(
                f"No {backend.name} build target matches device '{device}'; the targets are: "
                + "; ".join(_describe(info) for info in options)
                + "."
            )
        options = chosen
    if len(options) > 1:
        raise BadInput(
            f"Several {backend.name} build targets are live; name one with 'device' "
            "(part of its device name, or its compute capability such as 'sm_90'): "
            + "; ".join(_describe(info) for info in options)
            + "."
        )
    return options[0]


def all_targets(worker_targets: Sequence[JobTarget]) -> list[dict[str, str | None]]:
    """Every target a build can be queued for now: this host's building backends and live workers'."""
    from service.backends.registry import backend_statuses

    found: dict[tuple[str, str, str, str | None], dict[str, str | None]] = {}
    for info, availability in backend_statuses():
        if info is not None and availability.can_build:
            found[_identity(info)] = _target_dict(info, "api-host")
    for info in worker_infos(worker_targets):
        found.setdefault(_identity(info), _target_dict(info, "worker"))
    return sorted(found.values(), key=lambda t: (t["backend"] or "", t["version"] or "", t["device"] or ""))


def _target_dict(info: BackendInfo, where: str) -> dict[str, str | None]:
    return {
        "backend": info.name,
        "version": info.version,
        "device": info.device,
        "compute_capability": info.compute_capability,
        "built_by": where,
    }


def targets_from_statuses(
    statuses: Sequence[tuple[BackendInfo | None, Availability]], *, backends: Sequence[str] = ()
) -> tuple[JobTarget, ...]:
    """The targets of the backends that can build here (optionally only those named in ``backends``)."""
    targets = []
    for info, availability in statuses:
        if info is None or not availability.can_build:
            continue
        if backends and info.name not in backends:
            continue
        targets.append(JobTarget(info.name, info.version, info.device, info.compute_capability))
    return tuple(targets)


def local_targets(backends: Sequence[str] = ()) -> tuple[JobTarget, ...]:
    """What this host can build, from the backend registry."""
    from service.backends.registry import backend_statuses

    return targets_from_statuses(backend_statuses(), backends=backends)
