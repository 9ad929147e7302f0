"""The backend contract: one small Protocol and the values that cross it.

A backend turns a prepared ONNX model (already Q/DQ-quantized and FP16-typed where the backend is
strongly typed) into engine bytes plus a :class:`LayerReport`, and loads engine bytes into a
:class:`Runner`. Backends import their heavy libraries inside functions so this package imports on any
host; ``available()`` says why not when a backend cannot be used here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

import numpy as np

from service.backends.capabilities import BackendCapabilities, capabilities_of

Precision = Literal["int8", "fp16", "fp32"]
LayerPrecision = Literal["int8", "fp16", "fp32", "mixed", "other"]


@dataclass(frozen=True)
class Availability:
    """Whether a backend can build (and run) here, and if not, why."""

    can_build: bool
    can_run: bool
    reason: str = ""


@dataclass(frozen=True)
class BackendInfo:
    """Identity of a backend on this host: goes into engine cache keys and every report."""

    name: str
    version: str
    device: str  # e.g. "NVIDIA H100 80GB HBM3 (sm_90)" or "CPU (x86_64, 2 cores)" or "ahead-of-time (no GPU)"
    compute_capability: str | None = None
    strongly_typed: bool = True

    @property
    def capabilities(self) -> BackendCapabilities:
        """What this backend can do (declared by name in :mod:`service.backends.capabilities`)."""
        return capabilities_of(self.name)


@dataclass(frozen=True)
class ShapeRange:
    """Optimization-profile dims for one dynamic input."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class BuildSpec:
    """What to build from the prepared model.

    ``precision`` is the engine's target; strongly typed backends take their precisions from the
    ONNX types and Q/DQ nodes and use it only for reporting. ``keep_layers`` names ONNX nodes kept out
    of INT8 (pinned to FP16/FP32 on TensorRT 10's implicit path). ``calibration_cache`` and
    ``calibration_batches`` feed TensorRT 10's IInt8EntropyCalibrator2 for FP32 models.
    """

    precision: Precision
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)
    keep_layers: tuple[str, ...] = ()
    calibration_cache: bytes | None = None
    calibration_batches: Callable[[], Iterable[Mapping[str, np.ndarray]]] | None = None
    calibration_batch_size: int = 8
    workspace_bytes: int | None = None
    timing_cache_path: str | None = None
    # Samples ``calibration_batches`` yields per pass, when the caller knows; otherwise one pass counts them.
    calibration_samples: int | None = None


@dataclass(frozen=True)
class EngineLayer:
    """One layer of a built engine as the backend reports it."""

    name: str
    type: str  # backend layer type, e.g. "runtime_fusion", "correlation", "kgen", "Reformat", "FusedConv"
    precision: LayerPrecision
    input_dtypes: tuple[str, ...] = ()
    output_dtypes: tuple[str, ...] = ()
    onnx_nodes: tuple[str, ...] = ()  # ONNX node names fused into this layer
    is_reformat: bool = False  # reformat / cast / copy layers that only move or convert data


@dataclass(frozen=True)
class LayerReport:
    """The layers of a built engine and where the information came from."""

    layers: tuple[EngineLayer, ...]
    source: Literal["builder_log", "engine_inspector", "optimized_graph"]
    # ONNX nodes of the built model that no layer names: folded into constants, removed as no-ops
    # (Flatten/Reshape/Identity), or not traceable. Together with the layers' onnx_nodes, every node of
    # the model handed to the backend is accounted for.
    unmapped_nodes: tuple[str, ...] = ()

    def precision_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.precision] = counts.get(layer.precision, 0) + 1
        return counts

    @property
    def reformat_count(self) -> int:
        return sum(1 for layer in self.layers if layer.is_reformat)

    def layers_for_node(self, node_name: str) -> tuple[EngineLayer, ...]:
        return tuple(layer for layer in self.layers if node_name in layer.onnx_nodes)

    def mapped_nodes(self) -> frozenset[str]:
        """Every ONNX node name that at least one layer names."""
        return frozenset(node for layer in self.layers for node in layer.onnx_nodes)


@dataclass(frozen=True)
class BuiltEngine:
    """Engine bytes plus the evidence of what the builder did."""

    engine_bytes: bytes
    layer_report: LayerReport
    info: BackendInfo
    build_seconds: float
    build_log: str = ""
    file_extension: str = ".plan"  # ".plan" for TensorRT engines, ".onnx" for ONNX Runtime
    # The INT8 calibration cache TensorRT 10's calibrator wrote during this build, if it ran one.
    calibration_cache: bytes | None = None


@dataclass(frozen=True)
class IOSpec:
    """One engine input or output: dims are ints, or strings for dynamic dims."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]
    profile: ShapeRange | None = None


@runtime_checkable
class Runner(Protocol):
    """A loaded engine ready for inference; close() releases its memory."""

    @property
    def inputs(self) -> tuple[IOSpec, ...]: ...

    @property
    def outputs(self) -> tuple[IOSpec, ...]: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@dataclass(frozen=True)
class StageTimings:
    """Where one inference call spent its time, in milliseconds.

    GPU runners measure each stage with CUDA events on their stream; CPU runners have no copies, so
    ``h2d_ms`` and ``d2h_ms`` are 0 and ``compute_ms`` is wall-clock time of the run call.
    """

    h2d_ms: float
    compute_ms: float
    d2h_ms: float
    device: str = "cpu"

    @property
    def total_ms(self) -> float:
        return self.h2d_ms + self.compute_ms + self.d2h_ms


class RunnerBase(ABC):
    """What every runner of this package shares: its I/O specs, ``infer`` as the outputs of
    ``infer_timed``, and closing as a context manager. A subclass sets ``_inputs`` and ``_outputs``
    when it opens and implements :meth:`infer_timed` and :meth:`close` (idempotent)."""

    _inputs: tuple[IOSpec, ...]
    _outputs: tuple[IOSpec, ...]

    @property
    def inputs(self) -> tuple[IOSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[IOSpec, ...]:
        return self._outputs

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer_timed(feeds)[0]

    @abstractmethod
    def infer_timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], StageTimings]:
        """The outputs of one inference call and where it spent its time."""

    @abstractmethod
    def close(self) -> None:
        """Release the runner's memory; later calls raise, a second close does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@runtime_checkable
class TimedRunner(Runner, Protocol):
    """A runner that also reports per-stage timings (every runner in this package is one)."""

    def infer_timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], StageTimings]: ...


@runtime_checkable
class Backend(Protocol):
    """One way to build and run engines."""

    name: str

    def available(self) -> Availability: ...

    def describe(self) -> BackendInfo: ...

    def build(self, model: bytes, spec: BuildSpec) -> BuiltEngine: ...

    def load(self, engine_bytes: bytes) -> Runner: ...


@runtime_checkable
class RuntimeCacheLoader(Protocol):
    """A backend whose engines compile kernels when they first run and can keep them in a file.

    ``load_with_runtime_cache(engine, file)`` loads like ``load`` and keeps that engine's runtime
    cache in ``file`` (read at load, written after the first call and at close). TensorRT-RTX is one.
    """

    def load_with_runtime_cache(self, engine_bytes: bytes, cache_file: Path) -> Runner: ...
