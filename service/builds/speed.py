"""Speed honesty: an INT8 engine measured against the FP32 engine of the same model, here, briefly.

Contract: :func:`int8_speed_vs_fp32` builds the FP32 engine of the uploaded model with the same
backend, loads both, and times them on one real input (a calibration sample) alternately, so load
that comes and goes hits both alike: two warm-up runs each, then pairs of runs until ``budget_s`` is
spent or ``max_pairs`` pairs ran. The result carries both medians, the speedup and the device; when
INT8 is not faster it carries a warning that says so and recommends the faster precision. Only
backends that run on this host are measured (a TensorRT-RTX plan built on a CPU host is not).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.backends.base import Backend, BuildSpec, ShapeRange

MIN_SPEEDUP = 1.0  # INT8 at or below FP32's speed gains nothing for the accuracy it costs


@dataclass(frozen=True)
class SpeedCheck:
    """INT8 against FP32 on one input, on this host."""

    int8_ms: float
    fp32_ms: float
    speedup_vs_fp32: float
    pairs: int
    device: str
    batch: int
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def int8_speed_vs_fp32(
    backend: Backend,
    fp32_model: bytes,
    int8_engine: bytes,
    shapes: Mapping[str, ShapeRange],
    feeds: Mapping[str, np.ndarray],
    *,
    budget_s: float = 3.0,
    max_pairs: int = 30,
) -> SpeedCheck:
    """Median latency of both engines on ``feeds`` (see the module docstring)."""
    fp32 = backend.build(fp32_model, BuildSpec(precision="fp32", shapes=dict(shapes)))
    device = backend.describe().device
    with backend.load(int8_engine) as int8_runner, backend.load(fp32.engine_bytes) as fp32_runner:
        for _ in range(2):
            int8_runner.infer(feeds)
            fp32_runner.infer(feeds)
        int8_times: list[float] = []
        fp32_times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(int8_times) < max_pairs and (len(int8_times) < 3 or time.perf_counter() < deadline):
            for runner, times in ((int8_runner, int8_times), (fp32_runner, fp32_times)):
                started = time.perf_counter()
                runner.infer(feeds)
                times.append((time.perf_counter() - started) * 1000.0)
    int8_ms, fp32_ms = statistics.median(int8_times), statistics.median(fp32_times)
    speedup = fp32_ms / int8_ms if int8_ms > 0 else float("inf")
    warning = None
    if speedup <= MIN_SPEEDUP:
        warning = (
            f"INT8 is not faster than FP32 on this host ({int8_ms:.2f} ms vs {fp32_ms:.2f} ms per run, "
            f"{device}): build precision 'fp32' for this backend, or an INT8 engine for a GPU backend, "
            "which has INT8 tensor cores."
        )
    batch = int(np.asarray(next(iter(feeds.values()))).shape[0]) if feeds else 1
    return SpeedCheck(
        int8_ms=round(int8_ms, 6),  # microsecond-scale runs: keep the digits the speedup came from
        fp32_ms=round(fp32_ms, 6),
        speedup_vs_fp32=round(speedup, 4),
        pairs=len(int8_times),
        device=device,
        batch=batch,
        warning=warning,
    )
