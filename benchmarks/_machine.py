"""The machine a benchmark ran on, recorded next to its numbers.

:func:`describe_machine` reads the CPU model, the cores this process may use, total and available
memory, the OS, Python and the versions of the packages whose speed is being measured. Everything
comes from ``/proc``, :mod:`platform` and package metadata, so recording costs nothing and needs no
extra dependency. Missing facts (a non-Linux host, a package not installed) read ``"unknown"`` or
``"not installed"`` rather than failing the benchmark.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Distribution names as pip knows them; the module names differ for TensorRT-RTX.
MEASURED_PACKAGES: tuple[str, ...] = ("onnxruntime", "onnx", "tensorrt_rtx_cu12", "numpy")


@dataclass(frozen=True)
class MachineInfo:
    cpu_model: str
    logical_cores: int
    usable_cores: int
    memory_total_gib: float
    memory_available_gib: float
    os: str
    kernel: str
    python: str
    packages: tuple[tuple[str, str], ...]
    date: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_model": self.cpu_model,
            "logical_cores": self.logical_cores,
            "usable_cores": self.usable_cores,
            "memory_total_gib": self.memory_total_gib,
            "memory_available_gib_at_start": self.memory_available_gib,
            "os": self.os,
            "kernel": self.kernel,
            "python": self.python,
            "packages": dict(self.packages),
            "date": self.date,
        }

    def markdown(self) -> str:
        """A two-column Markdown table of the machine."""
        rows = [
            ("CPU", self.cpu_model),
            ("cores (usable / logical)", f"{self.usable_cores} / {self.logical_cores}"),
            ("memory (total, available at start)",
             f"{self.memory_total_gib:.1f} GiB, {self.memory_available_gib:.1f} GiB"),
            ("OS", f"{self.os} (kernel {self.kernel})"),
            ("Python", self.python),
            *((name, version) for name, version in self.packages),
            ("date (UTC)", self.date),
        ]  # fmt: skip
        lines = ["| machine | |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in rows]
        return "\n".join(lines)


def describe_machine() -> MachineInfo:
    """Facts about this host and process, read now."""
    memory = _meminfo()
    return MachineInfo(
        cpu_model=_cpu_model(),
        logical_cores=os.cpu_count() or 0,
        usable_cores=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count() or 0,
        memory_total_gib=round(memory.get("MemTotal", 0) / 2**20, 2),
        memory_available_gib=round(memory.get("MemAvailable", 0) / 2**20, 2),
        os=_os_name(),
        kernel=platform.release(),
        python=platform.python_version(),
        packages=tuple((name, _version(name)) for name in MEASURED_PACKAGES),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB; empty where there is none."""
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key] = int(fields[0])
    except OSError:
        pass
    return values


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
