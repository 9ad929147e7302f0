"""The thin CUDA layer under the TensorRT runner and calibrator: one Protocol, one real implementation.

Everything the GPU code asks of CUDA goes through :class:`CudaDevice`, so the runner, the calibrator
and the builder are tested on machines without a GPU by replacing it (``tests/backends/cuda_double.py``
records every pointer, size, dtype, shape, stream and context push/pop it is asked for).

The real implementation, :class:`DriverDevice`, is written against the CUDA *driver* API of
cuda-python (``cuda.bindings.driver``, ``cuda.cuda`` before cuda-python 12.6), whose semantics are
those of the CUDA documentation with no wrapper state in between:

- Context: the device's *primary* context (the one TensorRT's runtime API uses) is retained once per
  process (``cuDevicePrimaryCtxRetain``) when the device is first asked for, pushed and popped around
  every block of work (``cuCtxPushCurrent`` / ``cuCtxPopCurrent``) on whichever thread runs it, and
  released once at shutdown (:func:`release_devices`, ``cuDevicePrimaryCtxRelease``).
- Handles (device pointers, streams, events, executable graphs) are plain ints, valid while the
  primary context lives: free them inside :meth:`CudaDevice.activate` before :func:`release_devices`.
- CUDA graphs: :meth:`CudaDevice.capture_graph` records whatever ``enqueue`` puts on a stream
  (``cuStreamBeginCapture`` in thread-local mode, ``cuStreamEndCapture``), instantiates it
  (``cuGraphInstantiate``) and returns the executable graph; :meth:`launch_graph` runs it.

Every failing driver call raises :class:`CudaError` naming the call and the driver's error name.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import ModuleType
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike

from service.errors import BackendUnavailable


class CudaError(RuntimeError):
    """A CUDA driver call failed (the message names the call and CUDA's error name)."""


class CudaDevice(Protocol):
    """What the TensorRT code needs from one GPU. Every method but ``activate`` needs an active context."""

    name: str

    def activate(self) -> AbstractContextManager[None]:
        """Make the device's primary context current on this thread for the block (push, then pop)."""
        ...

    def alloc(self, nbytes: int) -> int:
        """Device memory of ``nbytes`` (at least 1); returns its address."""
        ...

    def free(self, pointer: int) -> None: ...

    def host_array(self, count: int, dtype: DTypeLike) -> np.ndarray:
        """A page-locked host array of ``count`` elements (fast, asynchronous copies)."""
        ...

    def free_host(self, array: np.ndarray) -> None: ...

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int | None = None) -> None:
        """Copy the C-contiguous ``array`` to ``pointer``: asynchronous on ``stream``, else synchronous."""
        ...

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int | None = None) -> None:
        """Copy ``array.nbytes`` from ``pointer`` into the C-contiguous ``array``."""
        ...

    def create_stream(self) -> int: ...

    def destroy_stream(self, stream: int) -> None: ...

    def synchronize(self, stream: int) -> None: ...

    def create_event(self) -> int: ...

    def destroy_event(self, event: int) -> None: ...

    def record_event(self, event: int, stream: int) -> None: ...

    def elapsed_ms(self, start: int, end: int) -> float: ...

    def capture_graph(self, stream: int, enqueue: Callable[[], None]) -> int:
        """Capture what ``enqueue`` puts on ``stream`` into an executable graph; returns its handle."""
        ...

    def launch_graph(self, graph: int, stream: int) -> None: ...

    def destroy_graph(self, graph: int) -> None: ...


class DriverDevice:
    """:class:`CudaDevice` on the CUDA driver API (cuda-python). Make one with :func:`cuda_device`."""

    def __init__(self, driver: ModuleType, index: int) -> None:
        self._cu = driver
        self._call("cuInit", 0)
        self._device = self._call("cuDeviceGet", index)
        raw = self._call("cuDeviceGetName", 256, self._device)
        self.name = bytes(raw).split(b"\0", 1)[0].decode(errors="replace")
        self._context = self._call("cuDevicePrimaryCtxRetain", self._device)
        self._released = False

    @contextmanager
    def activate(self) -> Iterator[None]:
        if self._released:
            raise BackendUnavailable(f"The CUDA context of {self.name} was released at shutdown.")
        self._call("cuCtxPushCurrent", self._context)
        try:
            yield
        finally:
            self._call("cuCtxPopCurrent")

    def alloc(self, nbytes: int) -> int:
        return int(self._call("cuMemAlloc", max(nbytes, 1)))

    def free(self, pointer: int) -> None:
        self._call("cuMemFree", pointer)

    def host_array(self, count: int, dtype: DTypeLike) -> np.ndarray:
        kind = np.dtype(dtype)
        nbytes = max(count, 1) * kind.itemsize
        pointer = int(self._call("cuMemAllocHost", nbytes))
        memory = (ctypes.c_byte * nbytes).from_address(pointer)
        return np.frombuffer(memoryview(memory), dtype=kind, count=max(count, 1))

    def free_host(self, array: np.ndarray) -> None:
        self._call("cuMemFreeHost", array.ctypes.data)

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int | None = None) -> None:
        if stream is None:
            self._call("cuMemcpyHtoD", pointer, array.ctypes.data, array.nbytes)
        else:
            self._call("cuMemcpyHtoDAsync", pointer, array.ctypes.data, array.nbytes, stream)

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int | None = None) -> None:
        if stream is None:
            self._call("cuMemcpyDtoH", array.ctypes.data, pointer, array.nbytes)
        else:
            self._call("cuMemcpyDtoHAsync", array.ctypes.data, pointer, array.nbytes, stream)

    def create_stream(self) -> int:
        return int(self._call("cuStreamCreate", 0))

    def destroy_stream(self, stream: int) -> None:
        self._call("cuStreamDestroy", stream)

    def synchronize(self, stream: int) -> None:
        self._call("cuStreamSynchronize", stream)

    def create_event(self) -> int:
        return int(self._call("cuEventCreate", 0))

    def destroy_event(self, event: int) -> None:
        self._call("cuEventDestroy", event)

    def record_event(self, event: int, stream: int) -> None:
        self._call("cuEventRecord", event, stream)

    def elapsed_ms(self, start: int, end: int) -> float:
        return float(self._call("cuEventElapsedTime", start, end))

    def capture_graph(self, stream: int, enqueue: Callable[[], None]) -> int:
        # Thread-local mode: other threads' unrelated CUDA calls cannot invalidate this capture.
        mode = self._cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        self._call("cuStreamBeginCapture", stream, mode)
        try:
            enqueue()
        finally:
            graph = self._call("cuStreamEndCapture", stream)  # always end, or the stream stays capturing
        try:
            return int(self._call("cuGraphInstantiate", graph, 0))
        finally:
            self._call("cuGraphDestroy", graph)  # the executable graph does not need its source

    def launch_graph(self, graph: int, stream: int) -> None:
        self._call("cuGraphLaunch", graph, stream)

    def destroy_graph(self, graph: int) -> None:
        self._call("cuGraphExecDestroy", graph)

    def release(self) -> None:
        """Release the primary context retained at creation (once; at shutdown)."""
        if not self._released:
            self._released = True
            self._call("cuDevicePrimaryCtxRelease", self._device)

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self._cu, name)(*args)
        error, values = result[0], result[1:]
        if error != self._cu.CUresult.CUDA_SUCCESS:
            described = self._cu.cuGetErrorName(error)
            label = described[1].decode() if described[0] == self._cu.CUresult.CUDA_SUCCESS else str(error)
            raise CudaError(f"CUDA call {name} failed: {label}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values


_DEVICES: dict[int, DriverDevice] = {}
_DEVICES_LOCK = threading.Lock()


def cuda_device(index: int = 0) -> CudaDevice:
    """The process-wide device for GPU ``index`` (its primary context retained on first use)."""
    with _DEVICES_LOCK:
        device = _DEVICES.get(index)
        if device is None:
            device = DriverDevice(driver_module(), index)
            _DEVICES[index] = device
        return device


def release_devices() -> None:
    """Release every primary context retained by :func:`cuda_device` (at process shutdown)."""
    with _DEVICES_LOCK:
        for device in _DEVICES.values():
            device.release()
        _DEVICES.clear()


def driver_module() -> ModuleType:
    """cuda-python's driver API module, or BackendUnavailable saying how to install it."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python before 12.6
        except ImportError as exc:
            raise BackendUnavailable(
                f"cuda-python is not installed (pip install 'engine-service[gpu]'): {exc}"
            ) from exc
    return driver
