"""The integer-instruction class of this CPU, which decides how ONNX Runtime's INT8 kernels behave.

ONNX Runtime's CPU integer kernels (MLAS) multiply uint8 activations by int8 weights (U8S8). How they
accumulate depends on the instruction set:

- with VNNI (``avx512_vnni``, ``avx_vnni``) or AMX (``amx_int8``) each u8 x s8 product goes straight
  into a 32-bit sum: exact;
- on AVX2 and on AVX-512 without VNNI, ``vpmaddubsw`` adds *pairs* of u8 x s8 products into a signed
  16-bit lane with saturation: two products of 255 x 127 (64,770) overflow it, so results depend on
  the CPU. ONNX Runtime documents this and recommends 7-bit weights (``reduce_range``) there;
- Arm's dot-product instructions accumulate in 32 bits: exact.

:func:`cpu_isa_from_flags` classifies a flag set; :func:`host_cpu_isa` classifies this host (cached),
unless the ``cpu_isa`` setting (``ENGINE_SERVICE_CPU_ISA``) names a class (to build engines for a
fleet of another class, or to test the other path here). ``CpuIsa.int8_weight_max`` is what the
ONNX Runtime Q/DQ placement quantizes
weights to: 127 where products accumulate exactly, 64 where pairs must fit 16 bits
(2 x 255 x 64 = 32,640 <= 32,767), so an engine computes the same integers on every CPU of its class.
The class is part of the ONNX Runtime backend's ``device``, hence of every engine key: an engine built
for one class is never served from the cache to a host of another.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import get_args

from service.config import IsaClass, get_settings

ISA_CLASSES: tuple[IsaClass, ...] = get_args(IsaClass)
FULL_RANGE_WEIGHT_MAX = 127
REDUCED_RANGE_WEIGHT_MAX = 64
# Classes whose U8S8 kernels add product pairs into saturating 16-bit lanes.
_SATURATING: frozenset[IsaClass] = frozenset({"avx512", "avx2", "other"})


@dataclass(frozen=True)
class CpuIsa:
    """One CPU's integer class and what it means for INT8 weights."""

    isa: IsaClass
    forced: bool = False  # set by ENGINE_SERVICE_CPU_ISA rather than read from the CPU

    @property
    def u8s8_saturates(self) -> bool:
        """True where u8 x s8 product pairs are summed in saturating 16-bit lanes."""
        return self.isa in _SATURATING

    @property
    def int8_weight_max(self) -> int:
        """Largest |weight| the ONNX Runtime placement quantizes to on this class."""
        return REDUCED_RANGE_WEIGHT_MAX if self.u8s8_saturates else FULL_RANGE_WEIGHT_MAX

    def describe(self) -> str:
        form = "7-bit weights (u8s8 pairs saturate in 16 bits)" if self.u8s8_saturates else "8-bit weights"
        return f"{self.isa}: {form}" + (" [set by ENGINE_SERVICE_CPU_ISA]" if self.forced else "")


def cpu_isa_from_flags(flags: frozenset[str] | set[str], machine: str = "x86_64") -> CpuIsa:
    """The class of a CPU from its ``/proc/cpuinfo`` flags (x86) or its machine name (Arm)."""
    if machine.lower() in ("aarch64", "arm64"):
        return CpuIsa("arm64")
    if "amx_int8" in flags:
        return CpuIsa("amx")
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return CpuIsa("avx512-vnni")
    if "avx_vnni" in flags:
        return CpuIsa("avx-vnni")
    if "avx512bw" in flags:
        return CpuIsa("avx512")
    if "avx2" in flags:
        return CpuIsa("avx2")
    return CpuIsa("other")


def parse_isa_class(value: str) -> IsaClass:
    """``value`` as an ISA class; ValueError naming the choices otherwise."""
    text = value.strip().lower()
    for name in ISA_CLASSES:
        if text == name:
            return name
    raise ValueError(f"unknown CPU ISA class {value!r}; choose one of {', '.join(ISA_CLASSES)}")


@lru_cache(maxsize=8)
def host_cpu_isa(forced: str | None = None) -> CpuIsa:
    """This host's class (cached), or ``forced`` (the ``cpu_isa`` setting) when one is given."""
    if forced:
        return CpuIsa(parse_isa_class(forced), forced=True)
    return cpu_isa_from_flags(cpu_flags(), platform.machine())


def host_int8_weight_max() -> int:
    """The ONNX Runtime weight range for this host's class (or the ``cpu_isa`` setting's)."""
    return host_cpu_isa(get_settings().cpu_isa).int8_weight_max


def cpu_flags() -> frozenset[str]:
    """The first processor's flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()
