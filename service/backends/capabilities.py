"""What each backend can do, declared once, so that no code outside ``backends/`` compares names.

Capabilities belong to a backend by name, the same for every version and device of it, so they are
also known for a backend that only appears as an identity (an engine key, a worker's target, a
stored engine record). A name this table does not know gets the TensorRT family's profile, which is
what every non-ONNX-Runtime backend had before the table existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PlacementTarget = Literal["tensorrt", "onnxruntime"]


@dataclass(frozen=True)
class BackendCapabilities:
    """One backend's capabilities."""

    fp16: bool  # it has FP16 kernels worth building for (TensorRT family); ONNX Runtime's CPU ones do not
    complete_shape_ranges: bool  # its builder needs min/opt/max for every dynamic input
    placement_target: PlacementTarget  # whose Q/DQ placement its INT8 builds take
    runs_on_cpu: bool  # its engines run on the CPU, so its latency figures are CPU figures
    engine_is_onnx: bool  # its engine is the prepared ONNX model itself (layer-by-layer comparison)
    int8_epilogue_in_separate_layers: bool  # INT8 convolutions run with bias/activation in own kernels
    loads_in_stock_triton: bool  # Triton's stock backends load its engines


_TENSORRT = BackendCapabilities(
    fp16=True,
    complete_shape_ranges=True,
    placement_target="tensorrt",
    runs_on_cpu=False,
    engine_is_onnx=False,
    int8_epilogue_in_separate_layers=False,
    loads_in_stock_triton=True,
)

_BY_NAME: dict[str, BackendCapabilities] = {
    "tensorrt": _TENSORRT,
    # Ahead-of-time plans: INT8 convolutions are correlation kernels with kgen epilogues, and the plan
    # loads only with the TensorRT-RTX runtime (not the enterprise TensorRT that Triton links).
    "tensorrt-rtx": BackendCapabilities(
        fp16=True,
        complete_shape_ranges=True,
        placement_target="tensorrt",
        runs_on_cpu=False,
        engine_is_onnx=False,
        int8_epilogue_in_separate_layers=True,
        loads_in_stock_triton=False,
    ),
    "onnxruntime": BackendCapabilities(
        fp16=False,
        complete_shape_ranges=False,
        placement_target="onnxruntime",
        runs_on_cpu=True,
        engine_is_onnx=True,
        int8_epilogue_in_separate_layers=False,
        loads_in_stock_triton=True,
    ),
}


def capabilities_of(backend_name: str) -> BackendCapabilities:
    """The capabilities of the backend named ``backend_name`` (the TensorRT family's when unknown)."""
    return _BY_NAME.get(backend_name, _TENSORRT)
