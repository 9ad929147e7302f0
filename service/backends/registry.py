"""The backends this service knows, by name, as process-wide singletons.

``get_backend(name)`` returns the backend for ``"tensorrt"``, ``"tensorrt-rtx"`` or ``"onnxruntime"``
(unknown names are BadInput listing the known ones). ``resolve_backend(name)`` also accepts
``"auto"``: enterprise TensorRT where it can build and run here (TensorRT + cuda-python + a GPU), otherwise
ONNX Runtime, which builds and runs on any CPU. ``backend_statuses()`` is what health/readiness shows.

Backends are cheap to create (nothing is imported until used) and cache their ``describe()``; the
singletons are created on first use, never at import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.backends.base import Availability, Backend, BackendInfo
from service.errors import BadInput, ServiceError

AUTO = "auto"


def _make_tensorrt() -> Backend:
    from service.backends.tensorrt import TensorRtBackend

    return TensorRtBackend()


def _make_tensorrt_rtx() -> Backend:
    from service.backends.tensorrt_rtx import TensorRtRtxBackend

    return TensorRtRtxBackend()


def _make_onnxruntime() -> Backend:
    from service.backends.onnxruntime import OnnxRuntimeBackend
    from service.config import get_settings

    return OnnxRuntimeBackend(cpu_isa=get_settings().cpu_isa)


_FACTORIES: dict[str, Callable[[], Backend]] = {
    "tensorrt": _make_tensorrt,
    "tensorrt-rtx": _make_tensorrt_rtx,
    "onnxruntime": _make_onnxruntime,
}
_instances: dict[str, Backend] = {}
_lock = threading.Lock()


# What the project's own test runs have verified, per backend path (also in README.md).
VERIFICATION = (
    "TensorRT-RTX builds: verified on CPU here (real builds in the test suite). TensorRT-RTX execution "
    "and the enterprise TensorRT path (build, calibration, runner, CUDA graphs): verified by review and "
    "CPU tests only (a recording CUDA device and a TensorRT runtime stand-in), never run on a GPU by "
    "this project's tests. ONNX Runtime: built and run on CPU here."
)


def backend_names() -> tuple[str, ...]:
    """The concrete backend names, in the order ``auto`` prefers them where it can."""
    return tuple(_FACTORIES)


def get_backend(name: str) -> Backend:
    """The singleton for a concrete backend name."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise BadInput(f"Unknown backend '{name}'; choose one of {', '.join(_FACTORIES)} or '{AUTO}'.")
    with _lock:
        backend = _instances.get(name)
        if backend is None:
            backend = _instances[name] = factory()
        return backend


def resolve_backend(name: str) -> Backend:
    """``auto`` -> ``tensorrt`` when it can build and run here, else ``onnxruntime``; other names as given."""
    if name != AUTO:
        return get_backend(name)
    tensorrt = get_backend("tensorrt")
    availability = tensorrt.available()
    if availability.can_build and availability.can_run:
        return tensorrt
    return get_backend("onnxruntime")


def backend_statuses() -> list[tuple[BackendInfo | None, Availability]]:
    """Every backend's identity (None when it cannot even describe itself here) and availability."""
    statuses: list[tuple[BackendInfo | None, Availability]] = []
    for name in _FACTORIES:
        backend = get_backend(name)
        availability = backend.available()
        info: BackendInfo | None = None
        if availability.can_build or availability.can_run:
            try:
                info = backend.describe()
            except ServiceError:
                info = None
        statuses.append((info, availability))
    return statuses
