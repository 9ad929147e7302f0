"""Backend capabilities are declared once, by name, for every backend the registry knows."""

from __future__ import annotations

import pytest

from service.backends.base import BackendInfo
from service.backends.capabilities import capabilities_of
from service.backends.registry import backend_names


@pytest.mark.parametrize("name", backend_names())
def test_every_registered_backend_declares_its_capabilities(name: str) -> None:
    from service.backends import capabilities

    assert name in capabilities._BY_NAME, f"{name} has no entry in service.backends.capabilities"


def test_the_cpu_backend_and_the_tensorrt_family_differ_where_builds_depend_on_it() -> None:
    cpu, rtx, trt = (
        capabilities_of("onnxruntime"),
        capabilities_of("tensorrt-rtx"),
        capabilities_of("tensorrt"),
    )
    assert (cpu.fp16, cpu.complete_shape_ranges, cpu.placement_target) == (False, False, "onnxruntime")
    assert cpu.runs_on_cpu and cpu.engine_is_onnx
    for family in (rtx, trt):
        assert (family.fp16, family.complete_shape_ranges, family.placement_target) == (
            True,
            True,
            "tensorrt",
        )
        assert not family.runs_on_cpu and not family.engine_is_onnx
    assert rtx.int8_epilogue_in_separate_layers and not rtx.loads_in_stock_triton
    assert not trt.int8_epilogue_in_separate_layers and trt.loads_in_stock_triton


def test_an_identity_alone_knows_its_capabilities_and_an_unknown_name_is_treated_as_tensorrt() -> None:
    assert BackendInfo("onnxruntime", "1.31", "CPU").capabilities == capabilities_of("onnxruntime")
    assert capabilities_of("tensorrt-next") == capabilities_of("tensorrt")
