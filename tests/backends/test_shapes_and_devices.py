"""Shape-range resolution against ONNX inputs, and the CUDA driver probe on a host without a GPU."""

from __future__ import annotations

import pytest

from service.backends.base import ShapeRange
from service.backends.devices import CudaProbe, GpuDevice, parse_sm, probe_cuda
from service.backends.shapes import shape_ranges_for
from service.errors import BadInput
from service.onnx_graph.inspect import TensorSpec

IMAGE = TensorSpec("image", "float32", ("N", 3, 224, 224))
MASK = TensorSpec("mask", "float32", (1, 1, 224, 224))


def test_dynamic_batch_defaults_to_one_and_says_so() -> None:
    ranges, notes = shape_ranges_for([IMAGE, MASK], {})
    assert ranges == {"image": ShapeRange((1, 3, 224, 224), (1, 3, 224, 224), (1, 3, 224, 224))}
    assert len(notes) == 1 and "input 'image'" in notes[0] and "batch 1" in notes[0]


def test_given_ranges_are_kept_for_dynamic_inputs_and_checked_for_static_ones() -> None:
    wanted = ShapeRange((1, 3, 224, 224), (8, 3, 224, 224), (16, 3, 224, 224))
    static = ShapeRange((1, 1, 224, 224), (1, 1, 224, 224), (1, 1, 224, 224))
    ranges, notes = shape_ranges_for([IMAGE, MASK], {"image": wanted, "mask": static})
    assert ranges == {"image": wanted} and notes == ()


@pytest.mark.parametrize("dims", [("N", 3, "H", "W"), (1, 3, "H", 224), ("?", "C", 224, 224)])
def test_dynamic_non_batch_dims_without_a_range_are_refused_with_an_example(
    dims: tuple[int | str, ...],
) -> None:
    spec = TensorSpec("x", "float32", dims)
    with pytest.raises(BadInput, match=r"Input 'x' has dynamic dimensions.*\"shapes\": \{\"x\": \{\"min\""):
        shape_ranges_for([spec], {})


def test_runtimes_that_take_any_shape_get_no_defaults_and_no_error() -> None:
    spec = TensorSpec("x", "float32", ("N", 3, "H", "W"))
    assert shape_ranges_for([spec], {}, complete=False) == ({}, ())


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (ShapeRange((1, 1, 224, 224), (2, 1, 224, 224), (2, 1, 224, 224)), "axis 0 is fixed at 1"),
        (ShapeRange((1, 1, 224, 224), (1, 1, 224, 224), (1, 1, 0, 224)), "must be >= 1"),
    ],
)
def test_static_inputs_must_match_their_fixed_dims(given: ShapeRange, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        shape_ranges_for([MASK], {"mask": given})


def test_probe_on_a_host_without_a_driver_explains_why_and_is_cached() -> None:
    probe = probe_cuda()
    if probe.has_gpu:
        pytest.skip(f"this host has a GPU: {probe.first.describe() if probe.first else ''}")
    assert probe.devices == () and probe.first is None
    assert "NVIDIA driver" in probe.reason or "CUDA driver" in probe.reason
    assert probe_cuda() is probe


def test_gpu_device_describes_itself_with_its_architecture() -> None:
    device = GpuDevice(
        index=0, name="NVIDIA RTX A4000", compute_capability=(8, 6), total_memory_bytes=16 << 30
    )
    assert device.sm == "sm_86"
    assert device.describe() == "NVIDIA RTX A4000 (sm_86)"
    assert CudaProbe((device,)).first is device


@pytest.mark.parametrize(
    ("tag", "cc"), [("sm_86", (8, 6)), ("8.9", (8, 9)), ("120", (12, 0)), ("SM_75", (7, 5))]
)
def test_compute_capability_tags_parse(tag: str, cc: tuple[int, int]) -> None:
    assert parse_sm(tag) == cc


@pytest.mark.parametrize("tag", ["ampere", "sm_", "", "8.x"])
def test_unreadable_compute_capability_tags_are_bad_input(tag: str) -> None:
    with pytest.raises(BadInput, match="not a compute capability"):
        parse_sm(tag)
