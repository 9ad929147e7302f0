"""What a stored calibration set holds: its file layout, per-input summaries and their statistics.

Written by :mod:`service.datasets.ingest` and read by :class:`service.datasets.storage.CalibrationSet`;
kept in its own module so both sides share one description of ``info.json`` without depending on each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.datasets.archives import SkippedMember
from service.datasets.preprocess import PreprocessSpec

SetFormat = Literal["npz", "npy", "images"]
UNNAMED_INPUT = "input"
INFO_FILE = "info.json"
MAX_REPORTED_SKIPPED = 200
# Per-channel statistics for rank-4 arrays with at most this many channels on axis 1.
MAX_STAT_CHANNELS = 64


@dataclass(frozen=True)
class ChannelStats:
    """min/max/mean/std (population) per channel, or one entry for the whole tensor.

    ``axis`` is the channel axis of the stored array (axis 0 = samples): 1 for NCHW-like rank-4
    arrays and NCHW images, 3 for NHWC images, None when the statistics cover the whole tensor.
    """

    axis: int | None
    min: tuple[float, ...]
    max: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class InputSummary:
    """One stored input. ``shape`` is the per-sample shape, without the sample axis."""

    name: str
    named: bool
    shape: tuple[int, ...]
    dtype: str
    stats: ChannelStats


@dataclass(frozen=True)
class CalibrationSetInfo:
    """What an ingested set holds. ``skipped`` lists up to MAX_REPORTED_SKIPPED of ``skipped_count``."""

    format: SetFormat
    samples: int
    inputs: tuple[InputSummary, ...]
    source_filename: str
    preprocess: PreprocessSpec | None = None
    skipped: tuple[SkippedMember, ...] = ()
    skipped_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "samples": self.samples,
            "inputs": [
                {
                    "name": item.name,
                    "named": item.named,
                    "shape": list(item.shape),
                    "dtype": item.dtype,
                    "stats": {
                        "axis": item.stats.axis,
                        "min": list(item.stats.min),
                        "max": list(item.stats.max),
                        "mean": list(item.stats.mean),
                        "std": list(item.stats.std),
                    },
                }
                for item in self.inputs
            ],
            "source_filename": self.source_filename,
            "preprocess": self.preprocess.model_dump(mode="json") if self.preprocess else None,
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "skipped_count": self.skipped_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationSetInfo:
        inputs = tuple(
            InputSummary(
                name=item["name"],
                named=bool(item["named"]),
                shape=tuple(int(d) for d in item["shape"]),
                dtype=item["dtype"],
                stats=ChannelStats(
                    axis=item["stats"]["axis"],
                    min=tuple(item["stats"]["min"]),
                    max=tuple(item["stats"]["max"]),
                    mean=tuple(item["stats"]["mean"]),
                    std=tuple(item["stats"]["std"]),
                ),
            )
            for item in data["inputs"]
        )
        spec = data.get("preprocess")
        return cls(
            format=data["format"],
            samples=int(data["samples"]),
            inputs=inputs,
            source_filename=data["source_filename"],
            preprocess=PreprocessSpec.model_validate(spec) if spec is not None else None,
            skipped=tuple(SkippedMember(s["name"], s["reason"]) for s in data.get("skipped", ())),
            skipped_count=int(data.get("skipped_count", 0)),
        )


class StatsAccumulator:
    """Streaming per-channel statistics (Chan et al.'s pairwise mean/variance merge, in float64).

    A batch may cover only some channels (``channels``), so one huge sample can be folded in piece by
    piece; each channel keeps its own count.
    """

    def __init__(self, channel_axis: int | None, channels: int) -> None:
        self.axis = channel_axis
        size = channels if channel_axis is not None else 1
        self.count = np.zeros(size)
        self.low = np.full(size, np.inf)
        self.high = np.full(size, -np.inf)
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def update(self, batch: np.ndarray, channels: slice = slice(None)) -> None:
        """Fold in a batch (sample axis first) whose channel axis holds the ``channels`` of the input."""
        values = batch.astype(np.float64)
        if self.axis is None:
            values = values.reshape(1, -1)
        else:
            values = np.moveaxis(values, self.axis, 0).reshape(values.shape[self.axis], -1)
        count = values.shape[1]
        if count == 0:
            return
        self.low[channels] = np.minimum(self.low[channels], values.min(axis=1))
        self.high[channels] = np.maximum(self.high[channels], values.max(axis=1))
        batch_mean = values.mean(axis=1)
        batch_m2 = ((values - batch_mean[:, np.newaxis]) ** 2).sum(axis=1)
        before = self.count[channels]
        total = before + count
        delta = batch_mean - self.mean[channels]
        self.mean[channels] = self.mean[channels] + delta * (count / total)
        self.m2[channels] = self.m2[channels] + batch_m2 + delta**2 * (before * count / total)
        self.count[channels] = total

    def result(self) -> ChannelStats:
        std = np.sqrt(self.m2 / np.maximum(self.count, 1))
        return ChannelStats(
            axis=self.axis,
            min=tuple(float(v) for v in self.low),
            max=tuple(float(v) for v in self.high),
            mean=tuple(float(v) for v in self.mean),
            std=tuple(float(v) for v in std),
        )


def stats_axis(sample_shape: tuple[int, ...]) -> int | None:
    """The channel axis used for statistics of an array input (see :class:`ChannelStats`)."""
    if len(sample_shape) == 3 and sample_shape[0] <= MAX_STAT_CHANNELS:
        return 1
    return None


def array_file(index: int) -> str:
    """The stored file name of input ``index``."""
    return f"input_{index}.npy"
