"""What else the host was doing while a latency measurement ran: load average and other running jobs.

Latency jobs hold the host alone among the service's jobs (:mod:`service.jobs.host_gate`), but live
inference requests, jobs of processes that do not share the gate, and anything else on the machine
still compete for the CPUs. :class:`ConditionsWatch` samples the load average and the service's other
running jobs when a measurement starts and when it ends, and :class:`RunConditions` carries that into
every benchmark report, with a plain-language ``warning`` when the numbers may be distorted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# A 1-minute load average above this share of the usable cores is worth a warning.
BUSY_LOAD_SHARE = 0.5
OtherJobs = Callable[[], Sequence[str]]  # "kind id" of the service's other running jobs


def _load_average() -> tuple[float, float, float] | None:
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):  # not available on this platform
        return None
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class RunConditions:
    """The host during one measurement (start and end samples)."""

    exclusive: bool  # held the host gate alone
    waited_s: float  # waited that long for other jobs to finish first
    cores: int
    load_average_start: tuple[float, float, float] | None
    load_average_end: tuple[float, float, float] | None
    other_jobs: tuple[str, ...] = field(default=())  # running at the start or the end

    @property
    def warning(self) -> str:
        """Why the numbers may be distorted; empty when nothing suggests it."""
        reasons = []
        if self.other_jobs:
            reasons.append(f"other jobs ran meanwhile ({', '.join(self.other_jobs)})")
        peak = max(
            (load[0] for load in (self.load_average_start, self.load_average_end) if load), default=0.0
        )
        if peak > BUSY_LOAD_SHARE * self.cores:
            reasons.append(f"the 1-minute load average reached {peak:g} on {self.cores} cores")
        if not self.exclusive:
            reasons.append("the measurement did not hold the host alone")
        return "; ".join(reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "exclusive": self.exclusive,
            "waited_s": round(self.waited_s, 3),
            "cores": self.cores,
            "load_average_start": list(self.load_average_start) if self.load_average_start else None,
            "load_average_end": list(self.load_average_end) if self.load_average_end else None,
            "other_jobs": list(self.other_jobs),
            "warning": self.warning,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConditions:
        def load(value: Any) -> tuple[float, float, float] | None:
            return (float(value[0]), float(value[1]), float(value[2])) if value else None

        return cls(
            exclusive=bool(data.get("exclusive", False)),
            waited_s=float(data.get("waited_s", 0.0)),
            cores=int(data.get("cores", 1)),
            load_average_start=load(data.get("load_average_start")),
            load_average_end=load(data.get("load_average_end")),
            other_jobs=tuple(data.get("other_jobs", ())),
        )


class ConditionsWatch:
    """Samples the host when a measurement begins and when it ends (:meth:`begin`, :meth:`end`)."""

    def __init__(self, other_jobs: OtherJobs = lambda: (), *, exclusive: bool = False, waited_s: float = 0.0):
        self.other_jobs = other_jobs
        self.exclusive = exclusive
        self.waited_s = waited_s
        self._start: tuple[float, float, float] | None = None
        self._seen: dict[str, None] = {}

    def begin(self) -> None:
        self._start = _load_average()
        self._seen.update(dict.fromkeys(self.other_jobs()))

    def end(self) -> RunConditions:
        self._seen.update(dict.fromkeys(self.other_jobs()))
        return RunConditions(
            exclusive=self.exclusive,
            waited_s=self.waited_s,
            cores=_cores(),
            load_average_start=self._start,
            load_average_end=_load_average(),
            other_jobs=tuple(self._seen),
        )
