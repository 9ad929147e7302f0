"""Backend lookup by name, ``auto`` resolution and the statuses readiness reports."""

from __future__ import annotations

import pytest

from service.backends.base import Backend
from service.backends.registry import backend_names, backend_statuses, get_backend, resolve_backend
from service.errors import BadInput


def test_known_names_give_singletons_that_satisfy_the_protocol() -> None:
    assert backend_names() == ("tensorrt", "tensorrt-rtx", "onnxruntime")
    for name in backend_names():
        backend = get_backend(name)
        assert isinstance(backend, Backend)
        assert backend.name == name
        assert get_backend(name) is backend


@pytest.mark.parametrize("name", ["trt", "TensorRT", "", "auto "])
def test_unknown_names_are_bad_input_listing_the_choices(name: str) -> None:
    with pytest.raises(BadInput, match="choose one of tensorrt, tensorrt-rtx, onnxruntime or 'auto'"):
        get_backend(name)


def test_auto_picks_tensorrt_where_it_runs_and_onnxruntime_elsewhere() -> None:
    tensorrt = get_backend("tensorrt").available()
    expected = "tensorrt" if tensorrt.can_build and tensorrt.can_run else "onnxruntime"
    assert resolve_backend("auto").name == expected
    assert resolve_backend("tensorrt-rtx").name == "tensorrt-rtx"


def test_statuses_cover_every_backend_with_a_reason_when_unusable() -> None:
    statuses = backend_statuses()
    assert len(statuses) == 3
    by_availability = {info.name if info else None: availability for info, availability in statuses}
    assert by_availability["onnxruntime"].can_build and by_availability["onnxruntime"].can_run
    for info, availability in statuses:
        if not (availability.can_build and availability.can_run):
            assert availability.reason
        if info is None:
            assert not availability.can_build and not availability.can_run
