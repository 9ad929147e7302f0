"""Choosing a build's target among this host's backend and the targets live workers advertise."""

from __future__ import annotations

import pytest

from service.backends.registry import get_backend
from service.builds.targets import build_target, matches
from service.errors import BackendUnavailable, BadInput
from service.jobs.runner import JobTarget

H100 = JobTarget("tensorrt", "10.8.0", "NVIDIA H100 80GB HBM3 (sm_90)", "sm_90")
L4 = JobTarget("tensorrt", "10.8.0", "NVIDIA L4 (sm_89)", "sm_89")


def test_with_no_workers_the_local_backend_is_the_target() -> None:
    onnxruntime = get_backend("onnxruntime")
    assert build_target(onnxruntime, []) == onnxruntime.describe()


def test_a_worker_with_the_same_identity_as_this_host_is_the_same_target() -> None:
    onnxruntime = get_backend("onnxruntime")
    local = onnxruntime.describe()
    twin = JobTarget(local.name, local.version, local.device, local.compute_capability)
    assert build_target(onnxruntime, [twin, H100]) == local


def test_a_backend_this_host_cannot_build_is_built_by_the_live_worker_that_can() -> None:
    tensorrt = get_backend("tensorrt")
    if tensorrt.available().can_build:
        pytest.skip("this host builds TensorRT itself")
    target = build_target(tensorrt, [H100])
    assert (target.name, target.version, target.device, target.compute_capability) == (
        "tensorrt",
        "10.8.0",
        H100.device,
        "sm_90",
    )
    with pytest.raises(BackendUnavailable, match="no live worker builds anything"):
        build_target(tensorrt, [])
    with pytest.raises(BackendUnavailable, match="live workers build onnxruntime"):
        build_target(tensorrt, [JobTarget("onnxruntime", "1", "CPU")])


def test_several_targets_need_a_device_selector_that_picks_exactly_one() -> None:
    tensorrt = get_backend("tensorrt")
    if tensorrt.available().can_build:
        pytest.skip("this host builds TensorRT itself")
    with pytest.raises(BadInput, match="Several tensorrt build targets") as caught:
        build_target(tensorrt, [H100, L4])
    assert "H100" in caught.value.message and "L4" in caught.value.message
    assert build_target(tensorrt, [H100, L4], device="sm_89").device == L4.device
    assert build_target(tensorrt, [H100, L4], device="h100").device == H100.device
    with pytest.raises(BadInput, match="matches device 'A100'"):
        build_target(tensorrt, [H100, L4], device="A100")
    with pytest.raises(BadInput, match="Several"):
        build_target(tensorrt, [H100, L4], device="NVIDIA")  # matches both


def test_the_selector_matches_capabilities_exactly_and_names_in_part() -> None:
    info = build_target(get_backend("onnxruntime"), [])
    assert not matches(info, "")
    assert matches(info, info.device[:3].upper())
