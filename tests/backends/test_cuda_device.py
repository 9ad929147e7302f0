"""DriverDevice, the real CUDA layer, driven through a call-recording driver module (no GPU here).

Checks that every driver function it calls exists in the installed cuda-python with that name, and
the order of the context calls: retain once, push/pop around each block, release once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.backends.cuda_device import CudaError, DriverDevice

cu = pytest.importorskip("cuda.bindings.driver", reason="cuda-python (the 'gpu' extra) is not installed")


class RecordingDriver:
    """Answers every ``cu*`` call with success and a fake handle, and records the call."""

    CUresult = cu.CUresult
    CUstreamCaptureMode = cu.CUstreamCaptureMode

    def __init__(self, failing: str = "") -> None:
        self.calls: list[str] = []
        self.failing = failing

    def __getattr__(self, name: str) -> Callable[..., tuple[Any, ...]]:
        def call(*args: Any) -> tuple[Any, ...]:
            self.calls.append(name)
            if name == self.failing:
                return (cu.CUresult.CUDA_ERROR_OUT_OF_MEMORY,)
            if name == "cuGetErrorName":
                return (cu.CUresult.CUDA_SUCCESS, b"CUDA_ERROR_OUT_OF_MEMORY")
            if name == "cuDeviceGetName":
                return (cu.CUresult.CUDA_SUCCESS, b"NVIDIA Test GPU\0\0\0")
            if name == "cuMemAllocHost":
                self._host = np.zeros(64, np.uint8)  # real memory, so the numpy view is valid
                return (cu.CUresult.CUDA_SUCCESS, self._host.ctypes.data)
            if (
                name in ("cuCtxPushCurrent", "cuStreamBeginCapture", "cuInit")
                or "Destroy" in name
                or name
                in (
                    "cuMemFree",
                    "cuMemFreeHost",
                    "cuEventRecord",
                    "cuStreamSynchronize",
                    "cuGraphLaunch",
                    "cuDevicePrimaryCtxRelease",
                    "cuMemcpyHtoD",
                    "cuMemcpyHtoDAsync",
                    "cuMemcpyDtoH",
                    "cuMemcpyDtoHAsync",
                )
            ):
                return (cu.CUresult.CUDA_SUCCESS,)
            return (cu.CUresult.CUDA_SUCCESS, 0x1000 + len(self.calls))

        return call


def _exercise(device: DriverDevice) -> None:
    with device.activate():
        pointer = device.alloc(16)
        host = device.host_array(4, np.float32)
        stream = device.create_stream()
        events = [device.create_event() for _ in range(2)]
        device.record_event(events[0], stream)
        device.copy_to_device(pointer, host, stream)
        device.copy_to_host(host, pointer)
        graph = device.capture_graph(stream, lambda: None)
        device.launch_graph(graph, stream)
        device.synchronize(stream)
        device.elapsed_ms(events[0], events[1])
        device.destroy_graph(graph)
        for event in events:
            device.destroy_event(event)
        device.destroy_stream(stream)
        device.free_host(host)
        device.free(pointer)
    device.release()
    device.release()


def test_every_driver_call_exists_in_cuda_python_and_the_context_is_retained_once() -> None:
    driver = RecordingDriver()
    device = DriverDevice(driver, 0)  # type: ignore[arg-type]
    _exercise(device)
    assert device.name == "NVIDIA Test GPU"
    missing = sorted({name for name in driver.calls if not hasattr(cu, name)})
    assert not missing, f"cuda-python has no {missing}"
    assert driver.calls.count("cuDevicePrimaryCtxRetain") == 1
    assert driver.calls.count("cuDevicePrimaryCtxRelease") == 1
    assert driver.calls.count("cuCtxPushCurrent") == driver.calls.count("cuCtxPopCurrent") == 1
    capture = driver.calls.index("cuStreamBeginCapture")
    assert driver.calls[capture : capture + 4] == [
        "cuStreamBeginCapture",
        "cuStreamEndCapture",
        "cuGraphInstantiate",
        "cuGraphDestroy",
    ]


def test_a_failing_driver_call_raises_a_named_error_and_still_pops_the_context() -> None:
    driver = RecordingDriver(failing="cuMemAlloc")
    device = DriverDevice(driver, 0)  # type: ignore[arg-type]
    expected = "CUDA call cuMemAlloc failed: CUDA_ERROR_OUT_OF_MEMORY"
    with pytest.raises(CudaError, match=expected), device.activate():
        device.alloc(1 << 40)
    assert driver.calls.count("cuCtxPushCurrent") == driver.calls.count("cuCtxPopCurrent") == 1


def test_a_capture_whose_enqueue_fails_still_ends_the_capture() -> None:
    driver = RecordingDriver()
    device = DriverDevice(driver, 0)  # type: ignore[arg-type]

    def refuse() -> None:
        raise RuntimeError("execute_async_v3 refused")

    with device.activate(), pytest.raises(RuntimeError, match="refused"):
        device.capture_graph(0x10, refuse)
    assert "cuStreamEndCapture" in driver.calls and "cuGraphInstantiate" not in driver.calls
