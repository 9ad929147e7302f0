"""Accuracy of a candidate model (INT8, FP16, an engine) against its FP32 reference, streamed.

Contract: feed :class:`AccuracyAccumulator` one batch of reference and candidate outputs at a time
(``update``), then ``finish()`` returns an :class:`AccuracyReport` with, per output:

- ``cosine``: cosine similarity of all reference and candidate values taken as one vector;
- ``worst_sample_cosine``: the lowest cosine of a single sample (axis 0 is the batch axis), which
  catches one ruined image that the global figure averages away;
- ``snr_db``: ``10 * log10(sum ref**2 / sum (ref - cand)**2)``, clamped to +-:data:`MAX_SNR_DB`
  (300 dB: identical outputs; float32 rounding alone stays below about 150 dB) so reports stay
  JSON-safe and sortable;
- ``max_abs_error`` and ``mean_abs_error``;
- ``top1_agreement``: the fraction of rows whose arg-max agrees, for outputs that look like class
  scores: rank 2 ``[N, C]`` (a classifier) or rank 3 ``[N, T, C]`` (per-step scores, e.g. a CTC text
  recognizer), with ``C > 1``, arg-max over the last axis; None for every other output.

- ``worst_channel_cosine`` / ``worst_channel_snr_db``: the same figures per channel of the feature
  axis (axis 1; for rank 3 the shorter of axes 1 and 2, so ``[N, 84, 8400]`` and ``[N, 8400, 84]``
  both split into 84 channels), and the worst of them: one collapsed class-score channel of a
  detector shows here while the whole-output cosine stays near 1. Channels whose reference energy is
  below 1e-6 of the strongest channel's are left out (their cosine is noise), as are outputs with
  more than :data:`MAX_CHANNELS` channels;

Elements where either side is NaN or infinite are left out of every figure and counted in
``nonfinite_elements``; a non-zero count is itself the finding. Memory is constant in the number of
batches: only float64 running sums are kept.

:func:`evaluate_with_onnxruntime` runs both models with ONNX Runtime on the CPU over held-out batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.accuracy.task_metrics import TaskAccumulator, TaskMetrics
from service.accuracy.tasks import TaskSpec, guess_task
from service.errors import BadInput, InvalidInferenceInput, InvalidModel

if TYPE_CHECKING:
    import onnx
    import onnxruntime

MAX_SNR_DB = 300.0
MAX_CHANNELS = 4096
_WEAK_CHANNEL = 1e-6  # relative reference energy below which a channel's figures are noise


@dataclass(frozen=True)
class OutputAccuracy:
    """How closely one candidate output follows the reference (see the module docstring)."""

    name: str
    elements: int
    cosine: float
    worst_sample_cosine: float
    snr_db: float
    max_abs_error: float
    mean_abs_error: float
    top1_agreement: float | None
    nonfinite_elements: int = 0
    channel_axis: int | None = None
    worst_channel: int | None = None
    worst_channel_cosine: float | None = None
    worst_channel_snr_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AccuracyReport:
    """Per-output accuracy over all evaluated batches."""

    outputs: tuple[OutputAccuracy, ...]
    samples: int
    batches: int
    task: TaskMetrics | None = None

    def worst_cosine(self) -> float:
        """The lowest cosine over all outputs."""
        return min(o.cosine for o in self.outputs)

    def worst_snr_db(self) -> float:
        """The lowest SNR over all outputs: one number to rank candidates by (higher is better)."""
        return min(o.snr_db for o in self.outputs)

    def worst_channel_cosine(self) -> float:
        """The lowest per-channel cosine over all outputs (the whole-output cosine where none)."""
        return min(
            o.worst_channel_cosine if o.worst_channel_cosine is not None else o.cosine for o in self.outputs
        )

    def worst_channel_snr_db(self) -> float:
        return min(
            o.worst_channel_snr_db if o.worst_channel_snr_db is not None else o.snr_db for o in self.outputs
        )

    def metric(self, name: str) -> float | None:
        """A metric by name (``tasks.METRICS``): task metrics, or the worst output/channel figure."""
        whole = {
            "cosine": self.worst_cosine,
            "snr_db": self.worst_snr_db,
            "worst_channel_cosine": self.worst_channel_cosine,
            "worst_channel_snr_db": self.worst_channel_snr_db,
        }
        if name in whole:
            return whole[name]()
        if self.task is not None and name in self.task.metrics:
            return self.task.metrics[name]
        return None

    def output(self, name: str) -> OutputAccuracy:
        for item in self.outputs:
            if item.name == name:
                return item
        raise BadInput(f"no output named {name!r}; outputs are {[o.name for o in self.outputs]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.to_dict() if self.task is not None else None,
            "samples": self.samples,
            "batches": self.batches,
            "worst_cosine": self.worst_cosine(),
            "worst_snr_db": self.worst_snr_db(),
            "worst_channel_cosine": self.worst_channel_cosine(),
            "worst_channel_snr_db": self.worst_channel_snr_db(),
            "outputs": [o.to_dict() for o in self.outputs],
        }


class _OutputSums:
    """Running float64 sums for one output."""

    def __init__(self) -> None:
        self.elements = 0
        self.nonfinite = 0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.dot = 0.0
        self.err_sq = 0.0
        self.err_abs = 0.0
        self.err_max = 0.0
        self.worst_sample_cosine = 1.0
        self.top1_rows = 0
        self.top1_agree = 0
        self.classlike: bool | None = None
        self.channel_axis: int | None = None
        self.channel_sums: np.ndarray | None = None  # [channels, 3]: ref_sq, err_sq, dot (+ cand_sq)

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64)
        c = np.asarray(cand, dtype=np.float64)
        finite = np.isfinite(r) & np.isfinite(c)
        self.nonfinite += int(finite.size - np.count_nonzero(finite))
        r_f = np.where(finite, r, 0.0)
        c_f = np.where(finite, c, 0.0)
        err = r_f - c_f
        self.elements += int(np.count_nonzero(finite))
        self.ref_sq += float(np.sum(r_f * r_f))
        self.cand_sq += float(np.sum(c_f * c_f))
        self.dot += float(np.sum(r_f * c_f))
        self.err_sq += float(np.sum(err * err))
        abs_err = np.abs(err)
        self.err_abs += float(np.sum(abs_err))
        if abs_err.size:
            self.err_max = max(self.err_max, float(np.max(abs_err)))

        rows_r = r_f.reshape(r_f.shape[0], -1) if r_f.ndim >= 1 and r_f.shape[0] > 0 else r_f.reshape(1, -1)
        rows_c = c_f.reshape(rows_r.shape)
        per_sample = _cosine_rows(rows_r, rows_c)
        if per_sample.size:
            self.worst_sample_cosine = min(self.worst_sample_cosine, float(np.min(per_sample)))

        self._add_channels(r_f, c_f)
        classlike = r.ndim in (2, 3) and r.shape[-1] > 1
        self.classlike = classlike if self.classlike is None else (self.classlike and classlike)
        if classlike and r.size:
            # Rows with a non-finite score are compared too: NaN arg-max disagreeing is real damage.
            agree = np.argmax(np.nan_to_num(r, nan=-np.inf), axis=-1) == np.argmax(
                np.nan_to_num(c, nan=-np.inf), axis=-1
            )
            self.top1_rows += int(agree.size)
            self.top1_agree += int(np.count_nonzero(agree))

    def _add_channels(self, r: np.ndarray, c: np.ndarray) -> None:
        axis = channel_axis(r.shape)
        if axis is None or (self.channel_axis is not None and axis != self.channel_axis):
            self.channel_axis, self.channel_sums = None, None
            return
        if self.channel_sums is not None and self.channel_sums.shape[0] != r.shape[axis]:
            self.channel_axis, self.channel_sums = None, None
            return
        rr, cc = (
            np.moveaxis(r, axis, 0).reshape(r.shape[axis], -1),
            np.moveaxis(c, axis, 0).reshape(r.shape[axis], -1),
        )
        err = rr - cc
        sums = np.stack(
            [
                np.sum(rr * rr, axis=1),
                np.sum(cc * cc, axis=1),
                np.sum(rr * cc, axis=1),
                np.sum(err * err, axis=1),
            ],
            axis=1,
        )
        if self.channel_sums is None:
            self.channel_axis, self.channel_sums = axis, sums
        else:
            self.channel_sums += sums

    def _worst_channel(self) -> tuple[int | None, float | None, float | None]:
        sums = self.channel_sums
        if sums is None or not sums.size:
            return None, None, None
        strong = sums[:, 0] >= _WEAK_CHANNEL * float(np.max(sums[:, 0]))
        if not strong.any():
            return None, None, None
        cosines = np.array([_cosine(d, a, b) for a, b, d, _ in sums])
        snrs = np.array([snr_db(a, e) for a, _, _, e in sums])
        candidates = np.flatnonzero(strong)
        worst = int(candidates[np.argmin(cosines[candidates])])
        return worst, float(cosines[worst]), float(np.min(snrs[candidates]))

    def result(self, name: str) -> OutputAccuracy:
        worst, worst_cosine, worst_snr = self._worst_channel()
        return OutputAccuracy(
            name=name,
            elements=self.elements,
            cosine=_cosine(self.dot, self.ref_sq, self.cand_sq),
            worst_sample_cosine=self.worst_sample_cosine,
            snr_db=snr_db(self.ref_sq, self.err_sq),
            max_abs_error=self.err_max,
            mean_abs_error=self.err_abs / self.elements if self.elements else 0.0,
            top1_agreement=(self.top1_agree / self.top1_rows) if self.classlike and self.top1_rows else None,
            nonfinite_elements=self.nonfinite,
            channel_axis=self.channel_axis if worst is not None else None,
            worst_channel=worst,
            worst_channel_cosine=worst_cosine,
            worst_channel_snr_db=worst_snr,
        )


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The feature axis of an output (see the module docstring), or None when it has none to split."""
    if len(shape) < 2:
        return None
    axis = 1
    if len(shape) == 3 and shape[2] < shape[1]:
        axis = 2
    return axis if 1 < shape[axis] <= MAX_CHANNELS else None


class AccuracyAccumulator:
    """Streams reference/candidate output pairs; memory does not grow with the number of batches."""

    def __init__(
        self, task: TaskSpec | None = None, *, task_reason: str | None = None, task_guessed: bool = False
    ) -> None:
        """``task``: the task to judge (named, or guessed by the caller: ``task_guessed``); None guesses
        it from the first reference batch."""
        self._task_spec = task
        self._task_guessed = task_guessed
        self._task_reason = task_reason or "named on the request or the model"
        self._task: TaskAccumulator | None = None
        self._sums: dict[str, _OutputSums] = {}
        self._names: tuple[str, ...] | None = None
        self._samples = 0
        self._batches = 0

    def update(self, ref_outputs: Mapping[str, np.ndarray], cand_outputs: Mapping[str, np.ndarray]) -> None:
        """Add one batch; both mappings must name the same outputs with the same shapes."""
        if set(ref_outputs) != set(cand_outputs):
            raise BadInput(
                f"reference and candidate outputs differ: reference has {sorted(ref_outputs)}, "
                f"candidate has {sorted(cand_outputs)}"
            )
        names = tuple(sorted(ref_outputs))
        if self._names is None:
            self._names = names
            self._sums = {n: _OutputSums() for n in names}
        elif names != self._names:
            raise BadInput(f"batch outputs {list(names)} differ from the first batch's {list(self._names)}")
        for name in names:
            ref, cand = np.asarray(ref_outputs[name]), np.asarray(cand_outputs[name])
            if ref.shape != cand.shape:
                raise BadInput(
                    f"output {name!r}: reference shape {ref.shape} differs from candidate shape {cand.shape}"
                )
            self._sums[name].add(ref, cand)
        if self._task is None:
            if self._task_spec is not None:
                self._task = TaskAccumulator(
                    self._task_spec, guessed=self._task_guessed, reason=self._task_reason
                )
            else:
                spec, reason = guess_task(ref_outputs)
                self._task = TaskAccumulator(spec, guessed=True, reason=f"guessed: {reason}")
        self._task.update(ref_outputs, cand_outputs)
        first = np.asarray(ref_outputs[names[0]]).shape if names else ()
        self._samples += int(first[0]) if first else 1
        self._batches += 1

    def finish(self) -> AccuracyReport:
        """The report over every batch added so far."""
        if self._names is None:
            raise BadInput("nothing to compare: no batches were evaluated; give at least one held-out batch")
        outputs = tuple(self._sums[n].result(n) for n in self._names)
        task = self._task.finish() if self._task is not None else None
        return AccuracyReport(outputs=outputs, samples=self._samples, batches=self._batches, task=task)


def snr_db(signal_energy: float, noise_energy: float) -> float:
    """Signal-to-noise ratio in dB, clamped to [-MAX_SNR_DB, MAX_SNR_DB] (exact match -> MAX_SNR_DB)."""
    if noise_energy <= 0.0:
        return MAX_SNR_DB
    if signal_energy <= 0.0:
        return -MAX_SNR_DB
    return max(-MAX_SNR_DB, min(MAX_SNR_DB, 10.0 * math.log10(signal_energy / noise_energy)))


def evaluate_with_onnxruntime(
    reference: bytes | onnx.ModelProto,
    candidate: bytes | onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    task: TaskSpec | None = None,
    simulate: bool = False,
) -> AccuracyReport:
    """Run both models on the CPU over ``batches`` and compare every output the reference produces.

    ``simulate`` runs the candidate's Q/DQ as float arithmetic (no integer kernels), which is what a
    GPU's INT8 computes up to rounding and the same on every CPU; without it the candidate runs as
    an ONNX Runtime engine would (fused integer kernels of this CPU).
    """
    options = cpu_session_options()
    ref_session = onnxruntime_session(reference, options)
    cand_session = onnxruntime_session(candidate, simulation_session_options() if simulate else options)
    names = [o.name for o in ref_session.get_outputs()]
    cand_names = {o.name for o in cand_session.get_outputs()}
    missing = [n for n in names if n not in cand_names]
    if missing:
        raise BadInput(
            f"the candidate model lacks reference outputs {missing}; compare models of the same graph"
        )
    accumulator = AccuracyAccumulator(task)
    for feeds in batches:
        accumulator.update(run_session(ref_session, names, feeds), run_session(cand_session, names, feeds))
    return accumulator.finish()


def cpu_session_options() -> onnxruntime.SessionOptions:
    """Session options shared by every comparison session: quiet logs, full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # unused-initializer warnings of exported models are noise here
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def simulation_session_options() -> onnxruntime.SessionOptions:
    """Options that keep Q/DQ as float arithmetic: basic optimizations only, so no QDQ fusion into
    integer kernels whose accumulation differs between CPUs (``backends/cpu_isa.py``)."""
    import onnxruntime as ort

    options = cpu_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return options


def onnxruntime_session(
    model: bytes | onnx.ModelProto, options: onnxruntime.SessionOptions | None = None
) -> onnxruntime.InferenceSession:
    """A CPU InferenceSession; a model ONNX Runtime cannot load is an InvalidModel."""
    import onnxruntime as ort

    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(
            data, options or cpu_session_options(), providers=["CPUExecutionProvider"]
        )
    except _ort_errors() as exc:
        raise InvalidModel(f"ONNX Runtime cannot load the model: {exc}") from exc


def run_session(
    session: onnxruntime.InferenceSession, names: list[str], feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Outputs ``names`` for one batch; feeds that do not fit the model are an InvalidInferenceInput."""
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    try:
        values = session.run(names, dict(feeds))
    except (InvalidArgument, ValueError) as exc:
        expected = [(i.name, i.type, i.shape) for i in session.get_inputs()]
        raise InvalidInferenceInput(f"the batch does not fit the model inputs {expected}: {exc}") from exc
    except _ort_errors() as exc:
        raise InvalidModel(f"ONNX Runtime failed to run the model: {exc}") from exc
    return dict(zip(names, (np.asarray(v) for v in values), strict=True))


def _ort_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (
        state.Fail,
        state.InvalidArgument,
        state.InvalidGraph,
        state.InvalidProtobuf,
        state.NotImplemented,
        state.RuntimeException,
        state.NoSuchFile,
    )


def _cosine(dot: float, a_sq: float, b_sq: float) -> float:
    if a_sq <= 0.0 and b_sq <= 0.0:
        return 1.0  # both all-zero: identical
    if a_sq <= 0.0 or b_sq <= 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / math.sqrt(a_sq * b_sq)))


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = np.sum(a * b, axis=1)
    a_sq, b_sq = np.sum(a * a, axis=1), np.sum(b * b, axis=1)
    both_zero = (a_sq <= 0) & (b_sq <= 0)
    denom = np.sqrt(a_sq * b_sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(np.where(both_zero, 1.0, cos), -1.0, 1.0)
