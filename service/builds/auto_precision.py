"""``precision: "auto"``: the fastest engine that meets the accuracy target, chosen on evidence.

Contract: an auto build has two candidates, INT8 and a float fallback (FP16 on TensorRT-family
backends, FP32 on ONNX Runtime, which gains nothing from FP16 on a CPU). The INT8 engine is built
first, as a plain INT8 request would build it (same key, so either request reuses the other's
engine). :func:`choose_precision` then decides from that engine's own evidence:

- INT8 below its accuracy target -> the fallback (FP32 is the reference; FP16 is not measured here).
- INT8 measured no faster than FP32 on this host -> the fallback.
- otherwise INT8. Where the backend cannot run on this host (a GPU backend built on a CPU host)
  speed is not measured and the choice says so: INT8 is then taken as the faster precision, which
  holds on GPUs with INT8 tensor cores and is a stated assumption, never a measurement.

The decision is a pure function of the INT8 engine's stored evidence, so a repeated auto request is
answered from the cache without a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from service.backends.capabilities import capabilities_of
from service.builds.speed import MIN_SPEEDUP

ChosenPrecision = Literal["int8", "fp16", "fp32"]
FallbackPrecision = Literal["fp16", "fp32"]


@dataclass(frozen=True)
class Int8Evidence:
    """What the INT8 engine's build found: accuracy verdict and measured speed (None: not measured)."""

    engine_id: str
    target_met: bool | None  # None: explicit Q/DQ model, nothing to compare against
    speedup_vs_fp32: float | None
    device: str | None = None

    @classmethod
    def from_report(cls, engine_id: str, report: Mapping[str, Any]) -> Int8Evidence:
        """From an engine record's report (``target_met``, ``speed``) or a build job's result."""
        speed = report.get("speed") or {}
        speedup = speed.get("speedup_vs_fp32", report.get("speedup_vs_fp32"))
        return cls(
            engine_id=engine_id,
            target_met=report.get("target_met"),
            speedup_vs_fp32=float(speedup) if speedup is not None else None,
            device=speed.get("device") or (report.get("backend") or {}).get("device"),
        )


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision an auto build delivers, and why."""

    chosen: ChosenPrecision
    reason: str
    int8: Int8Evidence
    fallback: FallbackPrecision
    speed_measured: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": "auto",
            "chosen": self.chosen,
            "reason": self.reason,
            "speed_measured": self.speed_measured,
            "fallback": self.fallback,
            "int8": asdict(self.int8),
        }


def fallback_precision(backend_name: str) -> FallbackPrecision:
    """FP16 where the backend has FP16 kernels worth having (TensorRT family), else FP32."""
    return "fp16" if capabilities_of(backend_name).fp16 else "fp32"


def choose_precision(int8: Int8Evidence, fallback: FallbackPrecision) -> PrecisionChoice:
    """Pick INT8 or ``fallback`` from the INT8 engine's evidence (see the module docstring)."""
    measured = int8.speedup_vs_fp32 is not None
    if int8.target_met is False:
        reason = (
            f"INT8 missed its accuracy target (engine {int8.engine_id[:12]}); "
            f"{fallback.upper()} keeps FP32's answers"
        )
        return PrecisionChoice(fallback, reason, int8, fallback, measured)
    if int8.speedup_vs_fp32 is not None and int8.speedup_vs_fp32 <= MIN_SPEEDUP:
        reason = (
            f"INT8 met its accuracy target but ran {int8.speedup_vs_fp32:.2f}x FP32's speed on "
            f"{int8.device or 'this host'}: not faster, so {fallback.upper()}"
        )
        return PrecisionChoice(fallback, reason, int8, fallback, measured)
    accuracy = (
        "INT8 met its accuracy target"
        if int8.target_met
        else "the model was quantized before upload (no accuracy target to check)"
    )
    if measured:
        where = int8.device or "this host"
        reason = f"{accuracy} and ran {int8.speedup_vs_fp32:.2f}x faster than FP32 on {where}"
    else:
        reason = (
            f"{accuracy}; speed not measured (the backend does not run on this host): INT8 is taken "
            "as the fastest precision, as on GPUs with INT8 tensor cores"
        )
    return PrecisionChoice("int8", reason, int8, fallback, measured)
