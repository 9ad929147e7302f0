"""The accuracy search: the cheapest INT8 configuration that meets the accuracy target.

Contract: :func:`search_quantization` takes the FP32 model, its activation histograms, held-out batches
and a :class:`SearchPlan`, and returns a :class:`SearchOutcome`: the activation ranges and Q/DQ model
it chose, the accuracy of that model (task metric first), and the path it took, every step with its
accuracy, INT8 share and whether the target held. Steps, cheapest first, stopping at the first that
meets every target:

1. ``method``: each calibration method (entropy, max, percentile, mse) for the whole model, judged by
   the task metric on held-out samples; the best is kept.
2. ``per_tensor``: each activation tensor takes the method whose threshold causes the least error in
   the output of the layer that reads it (``probe.py``); judged like a method.
3. ``keep``: the most sensitive layers stay in float (ranked by quantizing each alone and judging
   the outputs, for as many layers as a time budget allows, picked by the probe's local error), 1, 2, 4,
   ... of them, then bisected down to the fewest that meet the target, but never so many that less
   than ``min_int8_share`` of the convolutions run in INT8 (keeping everything in float meets any
   target and is not an INT8 engine). When even that does not meet the target, the best candidate
   seen is returned with ``target_met`` false and a warning: a shortfall is never silent.

Candidates are ranked by (every target met, smallest relative margin over the targets, worst SNR).
Every evaluation reuses the FP32 reference outputs computed once (``evaluation.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from service.accuracy.outputs import AccuracyReport
from service.accuracy.reference import ReferenceEvaluator
from service.accuracy.tasks import DEFAULT_TARGETS, AccuracyTarget, TaskSpec
from service.calibration.algorithms import thresholds_from_histograms
from service.calibration.histograms import AbsHistogram
from service.errors import JobCancelled
from service.onnx_graph.graph import GraphIndex
from service.quantize.probe import LayerProbe, ProbeEncoding, probe_layer_errors
from service.quantize.qdq import TENSORRT_PLACEMENT, QdqResult
from service.quantize.sensitivity import rank_layer_sensitivity
from service.quantize.skip import SkipSpec
from service.quantize.targets import QdqPlacement

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
CONCRETE_METHODS: tuple[str, ...] = ("entropy", "max", "percentile", "mse")
# Seconds of held-out evaluations the layer ranking may spend (each layer quantized alone costs one).
RANKING_BUDGET_S = 30.0
MIN_RANKED_LAYERS = 8
DEFAULT_MIN_INT8_SHARE = 0.7


@dataclass(frozen=True)
class SearchPlan:
    """What to search over and what counts as good enough."""

    methods: tuple[str, ...] = CONCRETE_METHODS
    percentile: float = 99.99
    skip: SkipSpec | None = None
    placement: QdqPlacement = TENSORRT_PLACEMENT
    task: TaskSpec | None = None  # None: guessed from the FP32 outputs
    targets: tuple[AccuracyTarget, ...] = ()  # empty: the task's defaults
    per_tensor: bool = True
    keep_layers: bool = True
    min_int8_share: float = DEFAULT_MIN_INT8_SHARE
    probe_samples: int = 4


@dataclass(frozen=True)
class SearchStep:
    """One candidate the search evaluated."""

    step: str
    description: str
    metrics: dict[str, float | None]
    int8_share: float
    target_met: bool
    kept_layers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "description": self.description,
            "metrics": self.metrics,
            "int8_share": self.int8_share,
            "target_met": self.target_met,
            "kept_layers": list(self.kept_layers),
        }


@dataclass(frozen=True)
class _Candidate:
    label: str
    amax: dict[str, float]
    qdq: QdqResult
    report: AccuracyReport
    kept: tuple[str, ...]


@dataclass(frozen=True)
class SearchOutcome:
    """What the search chose and how it got there."""

    method: str  # a method name, or "per_tensor"
    amax: dict[str, float]
    qdq: QdqResult
    accuracy: AccuracyReport
    targets: tuple[AccuracyTarget, ...]
    target_met: bool
    kept_layers: tuple[str, ...]
    int8_share: float
    steps: tuple[SearchStep, ...]
    per_tensor_methods: dict[str, int] = field(default_factory=dict)  # method -> tensors that took it
    warnings: tuple[str, ...] = ()
    method_reports: dict[str, AccuracyReport] = field(default_factory=dict)  # step 1, per method

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "targets": [t.model_dump() for t in self.targets],
            "target_met": self.target_met,
            "int8_share": self.int8_share,
            "kept_layers": list(self.kept_layers),
            "per_tensor_methods": dict(self.per_tensor_methods),
            "path": [s.to_dict() for s in self.steps],
        }


def search_quantization(
    model: onnx.ModelProto,
    histograms: Mapping[str, AbsHistogram],
    calibration: Batches,
    holdout: Batches,
    plan: SearchPlan,
    *,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchOutcome:
    """Run the search of the module docstring."""
    say = log or (lambda message: None)
    search = _Search(model, holdout, plan, should_stop)
    thresholds = {
        m: thresholds_from_histograms(histograms, m, percentile=plan.percentile)  # type: ignore[arg-type]
        for m in plan.methods
    }
    planned = len(plan.methods) + (1 if plan.per_tensor else 0) + (6 if plan.keep_layers else 0)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, planned), planned)

    best: _Candidate | None = None
    method_reports: dict[str, AccuracyReport] = {}
    for method in plan.methods:
        candidate = search.evaluate(
            f"method:{method}", f"calibration method {method!r}", thresholds[method], ()
        )
        method_reports[method] = candidate.report
        say(search.describe(candidate))
        best = search.better(best, candidate)
        tick()
    assert best is not None  # plan.methods is never empty
    per_tensor_counts: dict[str, int] = {}
    probes: dict[str, LayerProbe] = {}
    if not search.met(best) and (plan.per_tensor or plan.keep_layers) and len(search.quantized) > 0:
        probes = search.probe(thresholds, calibration)
    if not search.met(best) and plan.per_tensor and len(plan.methods) > 1 and probes:
        mixed, per_tensor_counts = _per_tensor_amax(thresholds, best.amax, probes, plan.methods)
        candidate = search.evaluate(
            "per_tensor", "per-tensor method chosen by the consuming layer's error", mixed, ()
        )
        say(search.describe(candidate))
        best = search.better(best, candidate)
        tick()
    if not search.met(best) and plan.keep_layers and probes:
        best = search.keep_layers(best, probes, say, tick)
    method = _method_of(best, thresholds)
    met = search.met(best)
    warnings: tuple[str, ...] = ()
    if not met:
        warnings = (search.shortfall(best),)
        say(f"warning: {warnings[0]}")
    return SearchOutcome(
        method=method,
        amax=best.amax,
        qdq=best.qdq,
        accuracy=best.report,
        targets=search.targets,
        target_met=met,
        kept_layers=best.kept,
        int8_share=search.int8_share(best.qdq),
        steps=tuple(search.steps),
        per_tensor_methods=per_tensor_counts if method == "per_tensor" else {},
        warnings=warnings,
        method_reports=method_reports,
    )


def _method_of(candidate: _Candidate, thresholds: Mapping[str, Mapping[str, float]]) -> str:
    for method, amax in thresholds.items():
        if candidate.amax == amax:
            return method
    return "per_tensor"


def _per_tensor_amax(
    thresholds: Mapping[str, Mapping[str, float]],
    base: Mapping[str, float],
    probes: Mapping[str, LayerProbe],
    methods: tuple[str, ...],
) -> tuple[dict[str, float], dict[str, int]]:
    """Each probed tensor's amax from the method with the least summed relative error in its readers."""
    totals: dict[str, np.ndarray] = {}
    for probe in probes.values():
        errors = np.asarray(probe.relative_errors(), dtype=np.float64)
        totals[probe.input] = totals.get(probe.input, np.zeros(len(methods))) + errors
    mixed = dict(base)
    counts: dict[str, int] = {}
    for tensor, errors in totals.items():
        method = methods[int(np.argmin(errors))]
        mixed[tensor] = thresholds[method][tensor]
        counts[method] = counts.get(method, 0) + 1
    return mixed, counts


class _Search:
    """The state shared by the steps: the prepared model, the reference outputs, the targets."""

    def __init__(
        self,
        model: onnx.ModelProto,
        holdout: Batches,
        plan: SearchPlan,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.model, self.plan, self.should_stop = model, plan, should_stop
        self.holdout = holdout
        self.reference = ReferenceEvaluator(model, holdout, task=plan.task)
        self.targets = plan.targets or DEFAULT_TARGETS[self.reference.task.kind]
        self.placement = plan.placement
        self.quantized = self.placement.summary(model, plan.skip).quantized
        self.prepared = self.placement.prepared(model)
        self.non_negative = self.placement.non_negative_tensors(self.prepared, plan.skip)
        index = GraphIndex(self.prepared.graph)
        self.convolutions = sum(1 for n in index.graph.node if n.op_type in ("Conv", "ConvTranspose"))
        self.steps: list[SearchStep] = []
        self.eval_seconds: list[float] = []

    def evaluate(
        self, label: str, description: str, amax: Mapping[str, float], kept: tuple[str, ...]
    ) -> _Candidate:
        if self.should_stop is not None and self.should_stop():
            raise JobCancelled("cancelled during the accuracy search")
        skip = self._skip(kept)
        qdq = self.placement.qdq_model(self.model, amax, skip=skip)
        started = time.perf_counter()
        report = self.reference.evaluate(qdq.model, simulate=self.placement.simulates_qdq)
        self.eval_seconds.append(time.perf_counter() - started)
        candidate = _Candidate(label, dict(amax), qdq, report, kept)
        self.steps.append(
            SearchStep(
                step=label,
                description=description,
                metrics={t.metric: report.metric(t.metric) for t in self.targets}
                | {"worst_snr_db": report.worst_snr_db()},
                int8_share=self.int8_share(qdq),
                target_met=self.met(candidate),
                kept_layers=kept,
            )
        )
        return candidate

    def met(self, candidate: _Candidate) -> bool:
        return all(_value(candidate.report, t) >= t.min for t in self.targets)

    def better(self, current: _Candidate | None, new: _Candidate) -> _Candidate:
        if current is None or self._key(new) > self._key(current):
            return new
        return current

    def _key(self, candidate: _Candidate) -> tuple[bool, float, float, float]:
        """Met first, then the smallest relative margin over the targets; between candidates that
        meet it, more INT8 (then SNR); between candidates that do not, more accuracy (then INT8)."""
        margins = [(_value(candidate.report, t) - t.min) / max(abs(t.min), 1e-6) for t in self.targets]
        share, snr = self.int8_share(candidate.qdq), candidate.report.worst_snr_db()
        met = self.met(candidate)
        return (met, round(min(margins), 9), share, snr) if met else (met, round(min(margins), 9), snr, share)

    def int8_share(self, qdq: QdqResult) -> float:
        """Share of the model's convolutions (or weighted layers, without any) that run in INT8."""
        types = {layer.node: layer.op_type for layer in self.quantized}
        if self.convolutions:
            conv = sum(1 for node in qdq.quantized_nodes if types.get(node) in ("Conv", "ConvTranspose"))
            return conv / self.convolutions
        total = len(qdq.quantized_nodes) + len(qdq.kept_nodes)
        return len(qdq.quantized_nodes) / total if total else 0.0

    def probe(
        self, thresholds: Mapping[str, Mapping[str, float]], calibration: Batches
    ) -> dict[str, LayerProbe]:
        index = GraphIndex(self.prepared.graph)
        layers = [layer for layer in self.quantized if index.find_node(layer.node) is not None]
        candidates = {
            index.node(layer.node).input[0]: [
                thresholds[m][index.node(layer.node).input[0]] for m in self.plan.methods
            ]
            for layer in layers
            if all(index.node(layer.node).input[0] in thresholds[m] for m in self.plan.methods)
        }
        encoding = ProbeEncoding(self.placement, self.non_negative)
        return probe_layer_errors(
            self.prepared,
            layers,
            candidates,
            calibration,
            encoding,
            max_samples=self.plan.probe_samples,
            should_stop=self.should_stop,
        )

    def keep_layers(
        self,
        base: _Candidate,
        probes: Mapping[str, LayerProbe],
        say: Callable[[str], None],
        tick: Callable[[], None],
    ) -> _Candidate:
        """Keep the most sensitive layers in float: doubling, then bisecting (module doc)."""
        order = self._sensitivity_order(base, probes, say)
        convs = {layer.node for layer in self.quantized if layer.op_type in ("Conv", "ConvTranspose")}
        limit = self._keep_limit(order, convs)
        if limit == 0:
            return base
        best = base
        failing, passing = 0, None
        k = 1
        while k <= limit:
            candidate = self._keep(base, order[:k], k)
            say(self.describe(candidate))
            tick()
            best = self.better(best, candidate)
            if self.met(candidate):
                passing = candidate
                break
            failing = k
            k = limit if k < limit and 2 * k > limit else 2 * k
        if passing is None:
            return best
        low, high = failing, len(passing.kept)
        while high - low > 1:
            middle = (low + high) // 2
            candidate = self._keep(base, order[:middle], middle)
            say(self.describe(candidate))
            if self.met(candidate):
                passing, high = candidate, middle
            else:
                low = middle
        return passing

    def _sensitivity_order(
        self, base: _Candidate, probes: Mapping[str, LayerProbe], say: Callable[[str], None]
    ) -> list[str]:
        """Layers most sensitive first: each quantized alone and judged at the outputs, which sees how
        much an early layer's error grows on its way (the probe's local error does not); as many as
        :data:`RANKING_BUDGET_S` of evaluations allow, chosen by the probe's local error, the rest after
        them in that order."""
        local = [p.node for p in sorted(probes.values(), key=lambda p: -_chosen_error(p, base.amax))]
        per_evaluation = statistics.median(self.eval_seconds) if self.eval_seconds else 1.0
        budget = max(MIN_RANKED_LAYERS, int(RANKING_BUDGET_S / max(per_evaluation, 1e-3)))
        ranking = rank_layer_sensitivity(
            self.model,
            base.amax,
            self.holdout,
            skip=self.plan.skip,
            placement=self.placement,
            max_layers=budget,
            prefer=local,
            reference=self.reference,
            should_stop=self.should_stop,
        )
        say(
            f"ranked {len(ranking)} layer(s) by their effect on the outputs; most sensitive: "
            + ", ".join(f"{r.node} ({r.snr_db:.1f} dB)" for r in ranking[:3])
        )
        ranked = [r.node for r in ranking]
        return ranked + [node for node in local if node not in set(ranked)]

    def _keep(self, base: _Candidate, kept: list[str], count: int) -> _Candidate:
        return self.evaluate(
            f"keep:{count}", f"{count} most sensitive layer(s) kept in float", base.amax, tuple(kept)
        )

    def _keep_limit(self, order: list[str], convs: set[str]) -> int:
        """How many of ``order`` may stay in float before the INT8 share of convolutions drops too low."""
        if not self.convolutions:
            return int(len(order) * (1.0 - self.plan.min_int8_share))
        quantized_convs = len(convs)
        allowed = quantized_convs - int(np.ceil(self.plan.min_int8_share * self.convolutions))
        count = 0
        for position, node in enumerate(order):
            if node in convs:
                if allowed <= 0:
                    return position
                allowed -= 1
            count = position + 1
        return count

    def describe(self, candidate: _Candidate) -> str:
        figures = ", ".join(f"{t.metric} {_format(candidate.report.metric(t.metric))}" for t in self.targets)
        verdict = "meets the target" if self.met(candidate) else "below target"
        return f"{candidate.label}: {figures} ({verdict})"

    def shortfall(self, candidate: _Candidate) -> str:
        misses = [
            f"{t.metric} {_format(candidate.report.metric(t.metric))} < {t.min}"
            for t in self.targets
            if _value(candidate.report, t) < t.min
        ]
        tried = ", ".join(step.step for step in self.steps)
        advice = (
            "try method 'auto' (the default), which also searches per-tensor thresholds and layers kept "
            "in float, or "
            if len(self.plan.methods) == 1
            else ""
        )
        return (
            f"INT8 misses the accuracy target on held-out samples ({'; '.join(misses)}); tried {tried}; "
            f"best: {candidate.label} with {len(candidate.kept)} layer(s) kept in float (at most "
            f"{1 - self.plan.min_int8_share:.0%} of the convolutions may stay out of INT8). This engine is "
            f"less accurate than FP32: {advice}use FP16/FP32, calibration samples closer to real inputs, "
            "or a lower target."
        )

    def _skip(self, kept: tuple[str, ...]) -> SkipSpec | None:
        base = self.plan.skip
        if not kept:
            return base
        if base is None:
            return SkipSpec(node_names=frozenset(kept))
        return SkipSpec(
            node_names=base.node_names | frozenset(kept),
            op_types=base.op_types,
            first=base.first,
            last=base.last,
        )


def _chosen_error(probe: LayerProbe, amax: Mapping[str, float]) -> float:
    """The probe's relative error at the amax the candidate uses for the layer's input."""
    errors = probe.relative_errors()
    chosen = amax.get(probe.input)
    if chosen is None:
        return min(errors)
    slot = int(np.argmin([abs(c - chosen) for c in probe.candidates]))
    return errors[slot]


def _value(report: AccuracyReport, target: AccuracyTarget) -> float:
    value = report.metric(target.metric)
    return float("-inf") if value is None else value


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
