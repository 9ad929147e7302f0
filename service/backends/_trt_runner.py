"""The GPU runner shared by the TensorRT and TensorRT-RTX backends (pycuda).

One ``TrtRunner`` owns one deserialized engine, one execution context and one CUDA stream, used in
the device's *primary* CUDA context (the context TensorRT's runtime API uses too), pushed around
every call so any thread may call it. A call:

1. copies each feed into a page-locked host buffer (``cuda.pagelocked_empty``; buffers and their
   device twins are kept and reused while shapes fit, and grow only when a larger shape arrives),
2. sets dynamic input shapes (``set_input_shape``) and every tensor address (``set_tensor_address``),
3. enqueues async H2D copies, ``execute_async_v3`` and async D2H copies on the stream, with a CUDA
   event between stages, so ``infer_timed`` reports H2D, compute and D2H separately.

Thread safety: one context and one stream admit one call at a time, so calls are serialised by a
lock. For parallel inference load several runners (each has its own context and stream).

CUDA graphs (``cuda_graph=True``, engines with static input shapes only): after the first ordinary
call, the ``execute_async_v3`` enqueue is captured once into a CUDA graph and later calls launch the
graph; copies stay outside the graph so the stage timings keep their meaning. Capture is re-done when
buffers are reallocated; if capture or launch fails the runner falls back to ordinary enqueues and
says so in its log. Data-dependent output shapes (outputs whose size is known only after running)
are not supported by this runner.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from service.backends._trt_common import capturing_logger, error_messages
from service.backends.base import IOSpec, ShapeRange, StageTimings
from service.errors import BackendUnavailable, EngineNotRunnableHere, InvalidInferenceInput

logger = logging.getLogger(__name__)


@contextmanager
def primary_context(device_index: int = 0) -> Iterator[Any]:
    """Make the device's primary CUDA context current for the block (pycuda)."""
    import pycuda.driver as cuda

    cuda.init()
    context = cuda.Device(device_index).retain_primary_context()
    context.push()
    try:
        yield context
    finally:
        cuda.Context.pop()
        context.detach()


@dataclass(eq=False)
class _Buffer:
    """A page-locked host array and its device twin, with room for ``capacity`` elements."""

    host: np.ndarray
    device: Any
    capacity: int

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.host[: math.prod(shape)].reshape(shape)


class TrtRunner:
    """A loaded TensorRT / TensorRT-RTX engine on GPU 0 (``CUDA_VISIBLE_DEVICES`` picks the GPU)."""

    def __init__(self, trt: ModuleType, engine_bytes: bytes, *, label: str, cuda_graph: bool = False) -> None:
        import pycuda.driver as cuda

        cuda.init()
        self._cuda = cuda
        self._trt = trt
        self._label = label
        self._device_name = cuda.Device(0).name()
        self._context = cuda.Device(0).retain_primary_context()
        self._lock = threading.Lock()
        self._closed = False
        self._log = capturing_logger(trt)
        self._buffers: dict[str, _Buffer] = {}
        self._graph: Any = None
        self._graph_key: tuple[Any, ...] | None = None
        try:
            with self._active():
                self._open(engine_bytes)
        except BaseException:
            self._context.detach()  # release the primary-context reference taken above
            raise
        self._inputs, self._outputs = _io_specs(trt, self._engine)
        self._use_graph = cuda_graph and not any(_has_dynamic(spec.shape) for spec in self._inputs)

    def _open(self, engine_bytes: bytes) -> None:
        self._runtime = self._trt.Runtime(self._log)
        self._check_validity(engine_bytes)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            raise EngineNotRunnableHere(
                f"{self._label} could not load this engine on {self._device_name}: "
                f"{' | '.join(error_messages(self._log.records)[-3:]) or 'no reason logged'}."
            )
        self._exec = self._engine.create_execution_context()
        if self._exec is None:
            raise BackendUnavailable(
                f"{self._label} could not create an execution context (out of GPU memory?)."
            )
        self._stream = self._cuda.Stream()
        self._events = tuple(self._cuda.Event() for _ in range(4))

    @property
    def inputs(self) -> tuple[IOSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[IOSpec, ...]:
        return self._outputs

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.infer_timed(feeds)[0]

    def infer_timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], StageTimings]:
        cuda = self._cuda
        with self._lock, self._active():
            if self._closed:
                raise BackendUnavailable(f"This {self._label} runner was closed.")
            staged = self._stage_inputs(feeds)
            outputs = self._output_views()
            start, copied_in, computed, copied_out = self._events
            start.record(self._stream)
            for name, view in staged.items():
                cuda.memcpy_htod_async(self._buffers[name].device, view, self._stream)
            copied_in.record(self._stream)
            self._enqueue()
            computed.record(self._stream)
            for name, view in outputs.items():
                cuda.memcpy_dtoh_async(view, self._buffers[name].device, self._stream)
            copied_out.record(self._stream)
            self._stream.synchronize()
            timings = StageTimings(
                h2d_ms=copied_in.time_since(start),
                compute_ms=computed.time_since(copied_in),
                d2h_ms=copied_out.time_since(computed),
                device=self._device_name,
            )
            if self._use_graph and self._graph is None:
                self._capture_graph()
            # Copies: the page-locked buffers are reused by the next call.
            return {name: view.copy() for name, view in outputs.items()}, timings

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with self._active():
                for buffer in self._buffers.values():
                    buffer.device.free()
                self._buffers.clear()
                self._graph = None
                del self._exec, self._engine, self._runtime
            self._context.detach()

    def __enter__(self) -> TrtRunner:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _active(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

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
                f"{self._label} reports this engine cannot run on {self._device_name}: "
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
            if _has_dynamic(spec.shape) and not self._exec.set_input_shape(spec.name, array.shape):
                raise InvalidInferenceInput(
                    f"Input '{spec.name}' has shape {list(array.shape)}, outside the engine's profile "
                    f"{spec.profile}."
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
            self._exec.set_tensor_address(name, int(buffer.device))
        return views

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> _Buffer:
        needed = max(math.prod(shape), 1)
        buffer = self._buffers.get(name)
        if buffer is not None and buffer.capacity >= needed and buffer.host.dtype == dtype:
            return buffer
        if buffer is not None:
            buffer.device.free()
        host = self._cuda.pagelocked_empty(needed, dtype)
        buffer = _Buffer(host=host, device=self._cuda.mem_alloc(host.nbytes), capacity=needed)
        self._buffers[name] = buffer
        self._graph = None  # a captured graph holds the old addresses
        return buffer

    def _enqueue(self) -> None:
        if self._graph is not None and self._graph_key == self._addresses():
            try:
                self._graph.launch(self._stream)
                return
            except (self._cuda.Error, TypeError) as exc:
                self._disable_graph(f"launching the CUDA graph failed ({exc})")
        if not self._exec.execute_async_v3(self._stream.handle):
            raise BackendUnavailable(
                f"{self._label} failed to run the engine: "
                f"{' | '.join(error_messages(self._log.records)[-3:]) or 'no reason logged'}."
            )

    def _capture_graph(self) -> None:
        """Capture one ``execute_async_v3`` (after an ordinary call, as TensorRT requires)."""
        cuda = self._cuda
        try:
            mode = getattr(getattr(cuda, "capture_mode", None), "THREAD_LOCAL", None)
            self._stream.begin_capture(*(() if mode is None else (mode,)))
            try:
                enqueued = self._exec.execute_async_v3(self._stream.handle)
            finally:
                graph = self._stream.end_capture()
            if not enqueued:
                raise RuntimeError("execute_async_v3 refused to enqueue under capture")
            self._graph = graph.instantiate()
            self._graph_key = self._addresses()
        except (AttributeError, RuntimeError, TypeError, cuda.Error) as exc:
            self._disable_graph(f"capturing a CUDA graph failed ({exc})")

    def _disable_graph(self, why: str) -> None:
        logger.warning("%s runner: %s; running without CUDA graphs", self._label, why)
        self._use_graph = False
        self._graph = None

    def _addresses(self) -> tuple[Any, ...]:
        return tuple(sorted((name, int(buffer.device)) for name, buffer in self._buffers.items()))

    @property
    def _input_names(self) -> list[str]:
        return [spec.name for spec in self._inputs]


def _has_dynamic(shape: tuple[int | str, ...]) -> bool:
    return any(not isinstance(dim, int) for dim in shape)


def _io_specs(trt: ModuleType, engine: Any) -> tuple[tuple[IOSpec, ...], tuple[IOSpec, ...]]:
    inputs: list[IOSpec] = []
    outputs: list[IOSpec] = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        try:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        except TypeError:  # bf16/fp8 have no numpy equivalent
            dtype = str(engine.get_tensor_dtype(name))
        dims = tuple(int(d) for d in engine.get_tensor_shape(name))
        shape: tuple[int | str, ...] = tuple(d if d >= 0 else "?" for d in dims)
        profile = None
        if is_input and any(d < 0 for d in dims):
            low, opt, high = engine.get_tensor_profile_shape(name, 0)
            profile = ShapeRange(tuple(low), tuple(opt), tuple(high))
        (inputs if is_input else outputs).append(IOSpec(name=name, dtype=dtype, shape=shape, profile=profile))
    return tuple(inputs), tuple(outputs)
