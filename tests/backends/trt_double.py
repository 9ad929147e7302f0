"""A TensorRT runtime stand-in for runner tests (no TensorRT runtime can run here).

It implements only the runtime calls ``TrtRunner`` makes, with TensorRT's names (a test checks each
name against the installed ``tensorrt_rtx``), and "runs" an engine computing ``y = 2 * x`` by reading
and writing the :class:`~tests.backends.cuda_double.RecordingDevice`'s simulated memory at the
addresses the runner set, so wrong addresses, sizes or dtypes show up as wrong numbers or
out-of-bounds errors. Under graph capture it records the work instead of doing it; launching the graph
replays it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from tests.backends.cuda_double import RecordingDevice


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT64 = "int64"
    BF16 = "bf16"


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


@dataclass(frozen=True)
class Tensor:
    name: str
    mode: TensorIOMode
    dtype: DataType
    dims: tuple[int, ...]


class FakeRuntimeCache:
    def __init__(self) -> None:
        self.loaded: list[bytes] = []
        self.kernels = b""

    def serialize(self) -> bytes:
        return self.kernels

    def deserialize(self, blob: bytes) -> bool:
        if not bytes(blob).startswith(b"kernels"):
            return False  # TensorRT-RTX rejects a cache from another GPU or version
        self.loaded.append(bytes(blob))
        self.kernels = bytes(blob)
        return True


class FakeRuntimeConfig:
    def __init__(self) -> None:
        self.cache: FakeRuntimeCache | None = None

    def create_runtime_cache(self) -> FakeRuntimeCache:
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache: FakeRuntimeCache) -> bool:
        self.cache = cache
        return True


@dataclass
class FakeContext:
    engine: FakeEngine
    config: FakeRuntimeConfig | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    addresses: dict[str, int] = field(default_factory=dict)
    executions: int = 0
    captured: list[dict[str, int]] = field(default_factory=list)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high, strict=True)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        tensor = self.engine.tensors[name]
        if tensor.mode is TensorIOMode.OUTPUT:  # y has x's shape
            return self.shapes.get("x", self.engine.tensors["x"].dims)
        return self.shapes.get(name, tensor.dims)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        device = self.engine.device
        if device.capturing:
            self.captured.append(dict(self.addresses))
            return True
        self._compute(self.addresses)
        return True

    def replay(self, graph: int) -> None:
        self._compute(self.captured[-1])

    def _compute(self, addresses: dict[str, int]) -> None:
        self.executions += 1
        if self.config is not None and self.config.cache is not None:
            self.config.cache.kernels = b"kernels for " + self.engine.name.encode()  # "JIT compiled"
        device = self.engine.device
        x = self.engine.tensors["x"]
        shape = self.get_tensor_shape("x")
        data = device.read(addresses["x"], x.dtype.value, shape)
        device.write(addresses["y"], (data * 2).astype(self.engine.tensors["y"].dtype.value))


@dataclass
class FakeEngine:
    name: str
    device: RecordingDevice
    tensors: dict[str, Tensor]
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    contexts: list[FakeContext] = field(default_factory=list)

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, index: int) -> str:
        return list(self.tensors)[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.tensors[name].mode

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.tensors[name].dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].dims

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
        assert self.profile is not None
        return self.profile

    def create_runtime_config(self) -> FakeRuntimeConfig:
        return FakeRuntimeConfig()

    def create_execution_context(self, runtime_config: FakeRuntimeConfig | None = None) -> FakeContext:
        context = FakeContext(self, runtime_config)
        self.contexts.append(context)
        self.device.on_graph_launch = context.replay  # type: ignore[method-assign]
        return context


def fake_tensorrt(engine: FakeEngine) -> ModuleType:
    """A module with the runtime names TrtRunner uses, deserialising every plan to ``engine``."""
    module = ModuleType(f"fake_tensorrt_{id(engine)}")

    class ILogger:
        def __init__(self) -> None:
            pass

    class Runtime:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> FakeEngine:
            return engine

    def nptype(dtype: DataType) -> Any:
        if dtype is DataType.BF16:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return np.dtype(dtype.value).type

    module.ILogger = ILogger  # type: ignore[attr-defined]
    module.Runtime = Runtime  # type: ignore[attr-defined]
    module.TensorIOMode = TensorIOMode  # type: ignore[attr-defined]
    module.nptype = nptype  # type: ignore[attr-defined]
    return module


def doubling_engine(
    device: RecordingDevice,
    *,
    dims: tuple[int, ...] = (2, 4),
    dtype: DataType = DataType.FLOAT,
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None,
) -> FakeEngine:
    """An engine ``y = 2 * x`` with input x of ``dims`` (-1 = dynamic, then ``profile`` applies)."""
    tensors = {
        "x": Tensor("x", TensorIOMode.INPUT, dtype, dims),
        "y": Tensor("y", TensorIOMode.OUTPUT, dtype, dims),
    }
    return FakeEngine("doubler", device, tensors, profile)
