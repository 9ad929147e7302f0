"""The soak's results: per-kind status counts and latency percentiles, the memory series and its trend."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from benchmarks._machine import MachineInfo


class _Sample(Protocol):
    kind: str
    status: int
    seconds: float


def _loads(values: tuple[float, ...]) -> str:
    return " / ".join(f"{value:.1f}" for value in values)


def kinds_table(samples: list[_Sample]) -> dict[str, dict[str, Any]]:
    by_kind: dict[str, list[_Sample]] = defaultdict(list)
    for sample in samples:
        by_kind[sample.kind].append(sample)
    table = {}
    for kind, rows in sorted(by_kind.items()):
        ms = np.array([row.seconds * 1000 for row in rows])
        table[kind] = {
            "requests": len(rows),
            "statuses": dict(sorted(Counter(str(row.status) for row in rows).items())),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p90_ms": round(float(np.percentile(ms, 90)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1),
        }
    return table


def memory_summary(series: list[tuple[float, float, float]], peak_mib: float) -> dict[str, Any]:
    """Start, end, peak and the trend of the second half (MiB per minute, least squares)."""
    if not series:
        return {}
    times = np.array([t for t, _, _ in series])
    totals = np.array([total for _, _, total in series])
    half = times >= times[-1] / 2
    slope = float(np.polyfit(times[half] / 60, totals[half], 1)[0]) if half.sum() >= 3 else 0.0
    per_minute: dict[int, float] = {}
    for t, _, total in series:
        per_minute[int(t // 60)] = max(per_minute.get(int(t // 60), 0.0), total)
    return {
        "samples": len(series),
        "start_mib": series[0][2],
        "end_mib": series[-1][2],
        "max_sampled_mib": float(totals.max()),
        "server_peak_vmhwm_mib": round(peak_mib, 1),
        "second_half_trend_mib_per_min": round(slope, 2),
        "max_per_minute_mib": {str(minute): value for minute, value in sorted(per_minute.items())},
    }


def write_report(
    results: Path,
    name: str,
    samples: list[_Sample],
    failures: list[str],
    series: list[tuple[float, float, float]],
    *,
    peak_mib: float,
    seconds: float,
    settings: dict[str, str],
    machine: MachineInfo,
    cpu_class: str,
    load_average: tuple[tuple[float, ...], tuple[float, ...]],
) -> dict[str, Any]:
    """Write ``<name>.json`` and ``<name>.md``; returns the summary."""
    kinds = kinds_table(samples)
    statuses = Counter(sample.status for sample in samples)
    summary = {
        "seconds": round(seconds, 1),
        "requests": len(samples),
        "status_5xx": sum(count for status, count in statuses.items() if status >= 500),
        "no_answer": statuses.get(0, 0),
        "hostile_not_4xx": sum(
            1 for sample in samples if sample.kind.startswith("hostile_") and not 400 <= sample.status < 500
        ),
        "memory": memory_summary(series, peak_mib),
    }
    (results / f"{name}.json").write_text(
        json.dumps(
            {
                "machine": machine.to_dict(),
                "cpu_class": cpu_class,
                "load_average_1_5_15min": {"start": load_average[0], "end": load_average[1]},
                "server_settings": settings,
                "summary": summary,
                "kinds": kinds,
                "failures": failures[:50],
                "memory_series": [
                    {"t_s": t, "server_mib": own, "with_children_mib": total} for t, own, total in series
                ],
            },
            indent=2,
        )
        + "\n"
    )
    lines = [
        f"# Soak: {seconds / 60:.1f} minutes of mixed load against one server process",
        "",
        "Produced by `python -m benchmarks.soak`. Uploads of models and calibration sets, INT8 ONNX Runtime",
        "builds, /infer (JSON and npz), benchmarks and the hostile bodies of issue 11 ran together against a",
        "`serve` process on a fresh data directory; server settings besides the defaults: "
        + ", ".join(f"`ENGINE_SERVICE_{k}={v}`" for k, v in settings.items())
        + ". The machine's cores were shared with other engineers' test runs, so latencies are loaded "
        f"ones (load average, 1/5/15 min: {_loads(load_average[0])} at the start, "
        f"{_loads(load_average[1])} at the end).",
        "",
        machine.markdown(),
        f"| CPU integer class | {cpu_class} |",
        "",
        "## Verdict",
        "",
        f"- requests: {summary['requests']}; 5xx: **{summary['status_5xx']}**; "
        f"no answer: {summary['no_answer']}; "
        f"hostile requests answered other than 4xx: {summary['hostile_not_4xx']}",
    ]
    memory = summary["memory"]
    if memory:
        lines += [
            f"- server RSS (with children): start {memory['start_mib']} MiB, end {memory['end_mib']} MiB, "
            f"max sampled {memory['max_sampled_mib']} MiB; "
            f"server peak (VmHWM) {memory['server_peak_vmhwm_mib']} MiB",
            f"- trend over the second half: {memory['second_half_trend_mib_per_min']} MiB per minute",
            "",
            "| minute | max RSS (MiB) |",
            "| --- | --- |",
            *(f"| {minute} | {value} |" for minute, value in memory["max_per_minute_mib"].items()),
        ]
    lines += ["", "## Requests", "", "| kind | requests | statuses | p50 ms | p90 ms | p99 ms | max ms |"]
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, row in kinds.items():
        codes = ", ".join(f"{code}: {count}" for code, count in row["statuses"].items())
        timings = " | ".join(str(row[key]) for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"))
        lines.append(f"| {kind} | {row['requests']} | {codes} | {timings} |")
    if failures:
        lines += [
            "",
            "## Failures (5xx or no answer)",
            "",
            *(f"- `{failure[:200]}`" for failure in failures[:20]),
        ]
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    return summary
