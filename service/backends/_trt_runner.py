"""The GPU runner shared by the TensorRT and TensorRT-RTX backends, over :mod:`cuda_device`.

One ``TrtRunner`` owns one deserialized engine, one execution context, one CUDA stream and four
events, all created and destroyed with the device's primary context pushed (``device.activate()``),
so any thread may call it. The primary context itself belongs to the process (retained once by
:func:`service.backends.cuda_device.cuda_device`, released at shutdown); a runner never releases it.
A call:

1. checks each feed against the engine (name, static shape; dtype converted to the engine's) and
   copies it into a page-locked host buffer (kept and reused while shapes fit, grown when a larger
   shape arrives),
2. sets dynamic input shapes (``set_input_shape``) and every tensor address (``set_tensor_address``),
3. enqueues async H2D copies, the engine (``execute_async_v3``, or the captured CUDA graph) and async
   D2H copies on the stream, with an event between stages, so ``infer_timed`` reports H2D, compute and
   D2H separately.

Calls are serialised by a lock (one context and one stream admit one call at a time); load several
runners for parallel inference.

CUDA graphs (``cuda_graph=True``, engines whose inputs are all static): after the first ordinary call
(TensorRT needs one before capture) the ``execute_async_v3`` enqueue is captured once
(``CudaDevice.capture_graph``) and later calls launch the graph; copies stay outside it so the stage
timings keep their meaning. ``graph_launches`` counts launches and ``graph_note`` says why graphs
are off when they are (dynamic shapes, or a capture that failed: then the runner logs a warning and
enqueues normally).

I/O must have numpy types: an engine with bf16 or fp8 inputs or outputs is refused at load
(EngineNotRunnableHere), since numpy feeds cannot be converted to them. Data-dependent output shapes
are not supported.

TensorRT-RTX compiles its kernels when an engine first runs. With ``runtime_cache`` (a file path) the
runner gives the execution context an ``IRuntimeCache`` loaded from that file and writes the cache
back (atomically) after the first call and at close, so the next load of the same engine on the same
GPU skips the compilation. A cache from another GPU or library version is rejected by TensorRT-RTX
and replaced.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from service.backends._trt_common import capturing_logger, error_messages
from service.backends.base import IOSpec, RunnerBase, ShapeRange, StageTimings
from service.backends.cuda_device import CudaDevice
from service.errors import BackendUnavailable, EngineNotRunnableHere, InvalidInferenceInput

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Buffer:
    """A page-locked host array and its device twin, with room for ``capacity`` elements."""

    host: np.ndarray
    device: int
    capacity: int

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.host[: math.prod(shape)].reshape(shape)


class TrtRunner(RunnerBase):
    """A loaded TensorRT / TensorRT-RTX engine on ``device``."""

    def __init__(
        self,
        trt: ModuleType,
        engine_bytes: bytes,
        *,
        label: str,
        device: CudaDevice,
        cuda_graph: bool = False,
        runtime_cache: Path | None = None,
    ) -> None:
        self._trt = trt
        self._label = label
        self._device = device
        self._lock = threading.Lock()
        self._closed = False
        self._log = capturing_logger(trt, keep="WARNING")
        self._buffers: dict[str, _Buffer] = {}
        self._graph: int | None = None
        self._graph_key: tuple[Any, ...] | None = None
        self._stream: int | None = None
        self._events: tuple[int, ...] = ()
        self._runtime_cache_file = runtime_cache
        self._runtime_cache: Any = None
        self._saved_runtime_cache: bytes | None = None
        self.graph_launches = 0
        with device.activate():
            try:
                self._open(engine_bytes)
            except BaseException:
                self._release_resources()
                raise
        dynamic = any(_has_dynamic(spec.shape) for spec in self._inputs)
        self._use_graph = cuda_graph and not dynamic
        self.graph_note = (
            "off (not asked for)"
            if not cuda_graph
            else "off: the engine has dynamic input shapes"
            if dynamic
            else "on: captured after the first call"
        )

    def _open(self, engine_bytes: bytes) -> None:
        self._runtime = self._trt.Runtime(self._log)
        self._check_validity(engine_bytes)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise EngineNotRunnableHere(
                f"{self._label} could not load this engine on {self._device.name}: "
                f"{' | '.join(error_messages(self._log.records)[-3:]) or 'no reason logged'}."
            )
        self._inputs, self._outputs = _io_specs(self._trt, self._engine, self._label)
        self._exec = self._execution_context()
        if self._exec is None:
            raise BackendUnavailable(
                f"{self._label} could not create an execution context (out of GPU memory?)."
            )
        self._stream = self._device.create_stream()
        self._events = tuple(self._device.create_event() for _ in range(4))

    def _execution_context(self) -> Any:
        if self._runtime_cache_file is None:
            return self._engine.create_execution_context()
        config = self._engine.create_runtime_config()
        cache = config.create_runtime_cache()
        stored = self._runtime_cache_file.read_bytes() if self._runtime_cache_file.exists() else b""
        if stored and not cache.deserialize(stored):
            logger.warning(
                "%s runtime cache %s does not match this GPU or library version; compiling afresh",
                self._label,
                self._runtime_cache_file,
            )
        else:
            self._saved_runtime_cache = stored or None
        if not config.set_runtime_cache(cache):
            raise BackendUnavailable(f"{self._label} refused its runtime cache for this engine.")
        self._runtime_cache = cache
        return self._engine.create_execution_context(config)

    def infer_timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], StageTimings]:
        device = self._device
        with self._lock, device.activate():
            if self._closed or self._stream is None:
                raise BackendUnavailable(f"This {self._label} runner was closed.")
            stream = self._stream
            staged = self._stage_inputs(feeds)
            outputs = self._output_views()
            start, copied_in, computed, copied_out = self._events
            device.record_event(start, stream)
            for name, view in staged.items():
                device.copy_to_device(self._buffers[name].device, view, stream)
            device.record_event(copied_in, stream)
            self._enqueue(stream)
            device.record_event(computed, stream)
            for name, view in outputs.items():
                device.copy_to_host(view, self._buffers[name].device, stream)
            device.record_event(copied_out, stream)
            device.synchronize(stream)
            timings = StageTimings(
                h2d_ms=device.elapsed_ms(start, copied_in),
                compute_ms=device.elapsed_ms(copied_in, computed),
                d2h_ms=device.elapsed_ms(computed, copied_out),
                device=device.name,
            )
            if self._use_graph and self._graph is None:
                self._capture_graph(stream)
            if self._runtime_cache is not None and self._saved_runtime_cache is None:
                self._save_runtime_cache()  # the first call compiled the kernels
            # Copies: the page-locked buffers are reused by the next call.
            return {name: view.copy() for name, view in outputs.items()}, timings

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._device.activate():
                if self._runtime_cache is not None:
                    self._save_runtime_cache()
                self._release_resources()

    def _release_resources(self) -> None:
        """Free everything this runner created; the caller has the context pushed."""
        device = self._device
        if self._graph is not None:
            device.destroy_graph(self._graph)
            self._graph = None
        for buffer in self._buffers.values():
            device.free(buffer.device)
            device.free_host(buffer.host)
        self._buffers.clear()
        for event in self._events:
            device.destroy_event(event)
        self._events = ()
        if self._stream is not None:
            device.destroy_stream(self._stream)
            self._stream = None
        # TensorRT objects release device memory when collected: drop them while the context is current.
        for name in ("_exec", "_runtime_cache", "_engine", "_runtime"):
            if hasattr(self, name):
                setattr(self, name, None)

    def _check_validity(self, engine_bytes: bytes) -> None:
        """Ask the runtime whether the engine suits this GPU before deserialising it, where it can say."""
        check = getattr(self._runtime, "get_engine_validity", None)
        header_size = getattr(self._runtime, "engine_header_size", 0)
        if check is None or not header_size:
            return
        validity, diagnostics = check(engine_bytes[:header_size])
        if validity == self._trt.EngineValidity.INVALID:
            reasons = [
                name
                for name, flag in self._trt.EngineInvalidityDiagnostics.__members__.items()
                if int(diagnostics) & int(flag)  # the members are bit masks
            ]
            raise EngineNotRunnableHere(
                f"{self._label} reports this engine cannot run on {self._device.name}: "
                f"{', '.join(reasons) or 'invalid engine'}. Rebuild it for this GPU and library version."
            )

    def _stage_inputs(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        staged: dict[str, np.ndarray] = {}
        for spec in self._inputs:
            if spec.name not in feeds:
                raise InvalidInferenceInput(
                    f"Input '{spec.name}' is missing; the engine needs {self._input_names}."
                )
            array = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
            if not _has_dynamic(spec.shape):
                if array.shape != spec.shape:  # a static input reads exactly its own size from the buffer
                    raise InvalidInferenceInput(
                        f"Input '{spec.name}' has shape {list(array.shape)}; this engine was built for "
                        f"exactly {list(spec.shape)}."
                    )
            elif not _fits(array.shape, spec.shape) or not self._exec.set_input_shape(spec.name, array.shape):
                raise InvalidInferenceInput(
                    f"Input '{spec.name}' has shape {list(array.shape)}, outside the engine's profile "
                    f"{spec.profile} (dims {list(spec.shape)})."
                )
            view = self._buffer(spec.name, array.shape, array.dtype).view(array.shape)
            np.copyto(view, array)
            staged[spec.name] = view
        return staged

    def _output_views(self) -> dict[str, np.ndarray]:
        views: dict[str, np.ndarray] = {}
        for spec in self._outputs:
            shape = tuple(int(d) for d in self._exec.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise BackendUnavailable(
                    f"Output '{spec.name}' has a data-dependent shape; this runner supports outputs whose "
                    "shapes follow from the input shapes."
                )
            views[spec.name] = self._buffer(spec.name, shape, np.dtype(spec.dtype)).view(shape)
        for name, buffer in self._buffers.items():
            self._exec.set_tensor_address(name, buffer.device)
        return views

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> _Buffer:
        needed = max(math.prod(shape), 1)
        buffer = self._buffers.get(name)
        if buffer is not None and buffer.capacity >= needed and buffer.host.dtype == dtype:
            return buffer
        if buffer is not None:
            self._device.free(buffer.device)
            self._device.free_host(buffer.host)
        host = self._device.host_array(needed, dtype)
        buffer = _Buffer(host=host, device=self._device.alloc(host.nbytes), capacity=needed)
        self._buffers[name] = buffer
        if self._graph is not None:  # a captured graph holds the old addresses
            self._device.destroy_graph(self._graph)
            self._graph = None
        return buffer

    def _enqueue(self, stream: int) -> None:
        if self._graph is not None and self._graph_key == self._addresses():
            self._device.launch_graph(self._graph, stream)
            self.graph_launches += 1
            return
        if not self._exec.execute_async_v3(stream):
            raise BackendUnavailable(
                f"{self._label} failed to run the engine: "
                f"{' | '.join(error_messages(self._log.records)[-3:]) or 'no reason logged'}."
            )

    def _capture_graph(self, stream: int) -> None:
        """Capture one ``execute_async_v3`` into a CUDA graph (after an ordinary call, as TensorRT asks)."""

        def enqueue() -> None:
            if not self._exec.execute_async_v3(stream):
                raise RuntimeError("execute_async_v3 refused to enqueue under stream capture")

        try:
            self._graph = self._device.capture_graph(stream, enqueue)
            self._graph_key = self._addresses()
        except RuntimeError as exc:  # CudaError included: the engine is not capturable, run it plainly
            self._use_graph = False
            self.graph_note = f"off: capturing a CUDA graph failed ({exc})"
            logger.warning("%s runner: %s", self._label, self.graph_note)

    def _save_runtime_cache(self) -> None:
        file = self._runtime_cache_file
        if file is None or self._runtime_cache is None:
            return
        data = bytes(memoryview(self._runtime_cache.serialize()))
        if not data or data == self._saved_runtime_cache:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        scratch = file.with_name(f"{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        scratch.write_bytes(data)
        os.replace(scratch, file)
        self._saved_runtime_cache = data

    def _addresses(self) -> tuple[Any, ...]:
        return tuple(sorted((name, buffer.device) for name, buffer in self._buffers.items()))

    @property
    def _input_names(self) -> list[str]:
        return [spec.name for spec in self._inputs]


def _has_dynamic(shape: tuple[int | str, ...]) -> bool:
    return any(not isinstance(dim, int) for dim in shape)


def _fits(shape: tuple[int, ...], dims: tuple[int | str, ...]) -> bool:
    """Same rank, and equal wherever the engine's dimension is static."""
    return len(shape) == len(dims) and all(
        not isinstance(dim, int) or dim == size for size, dim in zip(shape, dims, strict=True)
    )


def _io_specs(trt: ModuleType, engine: Any, label: str) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...]]:
    inputs: list[IOSpec] = []
    outputs: list[IOSpec] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        try:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        except TypeError as exc:  # bf16, fp8, fp4: numpy has no such type to feed or read
            raise EngineNotRunnableHere(
                f"{label} engine {'input' if is_input else 'output'} '{name}' has type "
                f"{engine.get_tensor_dtype(name)}, which numpy cannot represent, so this runner cannot feed "
                "or read it. Rebuild with float32, float16, int8, int32, int64 or bool I/O (keep the ONNX "
                "graph inputs and outputs in one of those types)."
            ) from exc
        dims = tuple(int(d) for d in engine.get_tensor_shape(name))
        shape: tuple[int | str, ...] = tuple(d if d >= 0 else "?" for d in dims)
        profile = None
        if is_input and any(d < 0 for d in dims):
            low, opt, high = engine.get_tensor_profile_shape(name, 0)
            profile = ShapeRange(tuple(low), tuple(opt), tuple(high))
        (inputs if is_input else outputs).append(IOSpec(name=name, dtype=dtype, shape=shape, profile=profile))
    return tuple(inputs), tuple(outputs)
