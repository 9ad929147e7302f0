"""Which NVIDIA GPUs this host has, asked of the CUDA driver directly.

``probe_cuda()`` loads the driver library (``libcuda.so.1`` / ``nvcuda.dll``) with ctypes and reads
each device's name, compute capability and memory. It needs neither cuda-python nor a CUDA toolkit, so
every backend can say why it cannot run here on any host, and the answer never depends on which
optional Python packages happen to be installed. The result is cached for the process: GPUs do not
come and go under a running service.

Initialising the driver (``cuInit``) in a process that later forks breaks CUDA in the children, so
nothing calls this at import; the first backend ``available()``/``describe()`` does.
``CUDA_VISIBLE_DEVICES`` is honoured by the driver itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from dataclasses import dataclass
from functools import lru_cache

from service.errors import BadInput

# CUdevice_attribute values from cuda.h (stable across CUDA releases).
_ATTR_CC_MAJOR = 75
_ATTR_CC_MINOR = 76


@dataclass(frozen=True)
class GpuDevice:
    """One CUDA device as the driver reports it."""

    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int

    @property
    def sm(self) -> str:
        """The architecture tag, e.g. ``sm_89``."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    def describe(self) -> str:
        return f"{self.name} ({self.sm})"


@dataclass(frozen=True)
class CudaProbe:
    """The CUDA devices found, or why there are none."""

    devices: tuple[GpuDevice, ...]
    driver_version: str | None = None
    reason: str = ""

    @property
    def has_gpu(self) -> bool:
        return bool(self.devices)

    @property
    def first(self) -> GpuDevice | None:
        return self.devices[0] if self.devices else None


class _Driver:
    """The few driver-API calls the probe needs, with their error strings."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib

    def check(self, result: int, call: str) -> None:
        if result == 0:
            return
        text = ctypes.c_char_p()
        self._lib.cuGetErrorString(result, ctypes.byref(text))
        message = text.value.decode(errors="replace") if text.value else f"CUDA error {result}"
        raise OSError(f"{call} failed: {message}")

    def int_out(self, call: str, *args: object) -> int:
        value = ctypes.c_int()
        self.check(getattr(self._lib, call)(ctypes.byref(value), *args), call)
        return value.value

    def device(self, ordinal: int) -> GpuDevice:
        handle = self.int_out("cuDeviceGet", ordinal)
        name = ctypes.create_string_buffer(256)
        self.check(self._lib.cuDeviceGetName(name, len(name), handle), "cuDeviceGetName")
        major = self.int_out("cuDeviceGetAttribute", _ATTR_CC_MAJOR, handle)
        minor = self.int_out("cuDeviceGetAttribute", _ATTR_CC_MINOR, handle)
        memory = ctypes.c_size_t()
        self.check(self._lib.cuDeviceTotalMem_v2(ctypes.byref(memory), handle), "cuDeviceTotalMem")
        return GpuDevice(
            index=ordinal,
            name=name.value.decode(errors="replace"),
            compute_capability=(major, minor),
            total_memory_bytes=int(memory.value),
        )


def _load_driver() -> ctypes.CDLL:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    if found and found not in names:
        names.append(found)
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError(f"none of {', '.join(names)} could be loaded")


@lru_cache(maxsize=1)
def probe_cuda() -> CudaProbe:
    """The CUDA devices visible to this process (cached); never raises."""
    try:
        lib = _load_driver()
    except OSError as exc:
        return CudaProbe((), reason=f"no NVIDIA driver on this host ({exc})")
    driver = _Driver(lib)
    try:
        driver.check(lib.cuInit(0), "cuInit")
        raw_version = driver.int_out("cuDriverGetVersion")
        version = f"{raw_version // 1000}.{(raw_version % 1000) // 10}"
        count = driver.int_out("cuDeviceGetCount")
        devices = tuple(driver.device(ordinal) for ordinal in range(count))
    except (OSError, AttributeError) as exc:  # AttributeError: a driver stub without these symbols
        return CudaProbe((), reason=f"the CUDA driver is present but unusable: {exc}")
    if not devices:
        return CudaProbe((), driver_version=version, reason="the CUDA driver reports no devices")
    return CudaProbe(devices, driver_version=version)


def parse_sm(tag: str) -> tuple[int, int]:
    """``"sm_86"`` / ``"8.6"`` / ``"86"`` -> ``(8, 6)``; ``"sm_120"`` -> ``(12, 0)``."""
    text = tag.strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, _, minor = text.partition(".")
    else:
        major, minor = text[:-1], text[-1:]
    if not (major.isdigit() and minor.isdigit()):
        raise BadInput(f"'{tag}' is not a compute capability; write it as sm_86 or 8.6.")
    return int(major), int(minor)
