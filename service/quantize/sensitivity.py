"""Per-layer INT8 sensitivity, and the smallest set of layers to keep in float for an accuracy bound.

Contract: :func:`rank_layer_sensitivity` evaluates, for each weighted layer the Q/DQ placement would
quantize, a model variant on held-out batches and returns :class:`LayerSensitivity` values ordered
most sensitive first. :func:`select_layers_to_keep` then keeps layers in float, one at a time in that
order, until the fully quantized rest meets ``min_snr_db`` and/or ``min_cosine``.

Mode. The default, ``quantize_one``, quantizes only the layer under test (its input, weights and,
for a Conv feeding a residual Add, that Add's other input) with everything else FP32: the measured
loss is that layer's own, independent of the others and comparable across layers, which is what a
ranking needs (the usual layer-wise sensitivity profiling of post-training quantization).
``exclude_one`` (fully quantized model minus the layer under test) captures interactions, but on a
deep network the errors of all other layers dominate every variant and the differences between
layers drown in them; it is there for models where the greedy selection stalls.
Each variant's score is its worst output (lowest SNR, then lowest cosine), measured against the
FP32 model by :class:`~service.accuracy.outputs.AccuracyAccumulator`.

Cost is bounded: the FP32 reference outputs are computed once and cached (with a fingerprint of each
input batch; ``eval_batches`` must replay the same batches on every call, or BadInput), all ONNX Runtime
sessions share one SessionOptions, and at most ``max_layers`` layers are evaluated (default
:data:`DEFAULT_MAX_LAYERS`). When a model has more, the first and last weighted layers plus the
layers with the largest relative weight-quantization noise are evaluated; the rest are left out of
the ranking (a static proxy: it misses activation-range problems, which is why the ends of the
network, where those usually are, are always included). Keep the held-out set small: every
evaluation runs it once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import onnx

from service.accuracy.reference import ReferenceEvaluator
from service.errors import BadInput, JobCancelled
from service.onnx_graph.graph import GraphIndex
from service.quantize.canonical import canonical_model
from service.quantize.placement import QDQ_MIN_OPSET, plan_qdq
from service.quantize.qdq import TENSORRT_PLACEMENT, QdqResult, quantize_weight
from service.quantize.skip import SkipSpec
from service.quantize.targets import QdqPlacement

DEFAULT_MAX_LAYERS = 64

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
Progress = Callable[[int, int], None]  # (evaluations done, evaluations planned)
ShouldStop = Callable[[], bool]


class SensitivityMode(StrEnum):
    """How a layer's sensitivity is measured (see the module docstring)."""

    QUANTIZE_ONE = "quantize_one"
    EXCLUDE_ONE = "exclude_one"


@dataclass(frozen=True)
class LayerSensitivity:
    """Accuracy of the variant evaluated for one layer (only it INT8, or all but it INT8)."""

    node: str
    op_type: str
    snr_db: float
    cosine: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SelectionResult:
    """Layers kept in float and the accuracy the rest reaches in INT8."""

    kept_layers: tuple[str, ...]  # from the ranking, in the order they were added
    snr_db: float
    cosine: float
    met: bool  # False: even keeping every ranked layer did not reach the bound (the last try is returned)
    evaluations: int
    qdq: QdqResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept_layers": list(self.kept_layers),
            "snr_db": self.snr_db,
            "cosine": self.cosine,
            "met": self.met,
            "evaluations": self.evaluations,
        }


def rank_layer_sensitivity(
    model: onnx.ModelProto,
    activation_amax: Mapping[str, float],
    eval_batches: Batches,
    *,
    mode: SensitivityMode = SensitivityMode.QUANTIZE_ONE,
    skip: SkipSpec | None = None,
    placement: QdqPlacement = TENSORRT_PLACEMENT,
    max_layers: int | None = DEFAULT_MAX_LAYERS,
    prefer: Sequence[str] = (),
    reference: ReferenceEvaluator | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> tuple[LayerSensitivity, ...]:
    """Layers ordered most sensitive first (lowest SNR when quantized alone; see the module docstring).

    ``prefer`` orders the layers to evaluate when ``max_layers`` leaves out some (the first and last
    layers are always evaluated); ``reference`` reuses FP32 outputs already computed on the same
    held-out batches. TensorRT-placement variants are judged with Q/DQ simulated in float.
    """
    if max_layers is not None and max_layers < 1:
        raise BadInput(f"max_layers must be at least 1; got {max_layers}")
    prepared = canonical_model(model, min_opset=QDQ_MIN_OPSET)
    base = skip or SkipSpec()
    layers = placement.summary(prepared, base).quantized
    quantized_nodes = tuple(layer.node for layer in layers)
    candidates = _layers_to_evaluate(prepared, quantized_nodes, max_layers, prefer)
    op_types = {layer.node: layer.op_type for layer in layers}
    evaluator = reference or ReferenceEvaluator(prepared, eval_batches)
    simulate = placement.simulates_qdq
    total = len(candidates) + 1
    _report(progress, 1, total)

    results: list[LayerSensitivity] = []
    everything = frozenset(quantized_nodes)
    for done, node in enumerate(candidates, start=2):
        _check_stop(should_stop)
        keep = everything - {node} if mode is SensitivityMode.QUANTIZE_ONE else frozenset({node})
        variant = placement.qdq_model(prepared, activation_amax, skip=_merged(base, keep))
        snr, cosine = _score(evaluator, variant.model, simulate)
        results.append(LayerSensitivity(node=node, op_type=op_types[node], snr_db=snr, cosine=cosine))
        _report(progress, done, total)

    order = {node: i for i, node in enumerate(quantized_nodes)}
    if mode is SensitivityMode.QUANTIZE_ONE:
        results.sort(key=lambda r: (r.snr_db, r.cosine, order[r.node]))
    else:  # the layer whose exclusion helps most is the most sensitive
        results.sort(key=lambda r: (-r.snr_db, -r.cosine, order[r.node]))
    return tuple(results)


def select_layers_to_keep(
    model: onnx.ModelProto,
    activation_amax: Mapping[str, float],
    eval_batches: Batches,
    ranking: Sequence[LayerSensitivity],
    *,
    min_snr_db: float | None,
    min_cosine: float | None,
    skip: SkipSpec | None = None,
    placement: QdqPlacement = TENSORRT_PLACEMENT,
    max_kept: int | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> SelectionResult:
    """Keep ranked layers in float, most sensitive first, until the output meets every given bound."""
    if min_snr_db is None and min_cosine is None:
        raise BadInput("give min_snr_db, min_cosine or both: the selection needs an accuracy bound to reach")
    if min_cosine is not None and not -1.0 <= min_cosine <= 1.0:
        raise BadInput(f"min_cosine must lie in [-1, 1]; got {min_cosine}")
    prepared = canonical_model(model, min_opset=QDQ_MIN_OPSET)
    base = skip or SkipSpec()
    quantizable = {layer.node for layer in placement.summary(prepared, base).quantized}
    order = [r.node for r in ranking]
    unknown = [n for n in order if n not in quantizable]
    if unknown:
        raise BadInput(
            f"the ranking names layers this model does not quantize: {unknown[:8]}; "
            "rank the same model with the same skip list"
        )
    limit = len(order) if max_kept is None else max(0, min(max_kept, len(order)))
    evaluator = ReferenceEvaluator(prepared, eval_batches)
    simulate = placement.simulates_qdq

    def meets(snr: float, cosine: float) -> bool:
        return (min_snr_db is None or snr >= min_snr_db) and (min_cosine is None or cosine >= min_cosine)

    kept: list[str] = []
    evaluations = 0
    while True:
        _check_stop(should_stop)
        result = placement.qdq_model(prepared, activation_amax, skip=_merged(base, frozenset(kept)))
        snr, cosine = _score(evaluator, result.model, simulate)
        evaluations += 1
        _report(progress, len(kept) + 1, limit + 1)
        if meets(snr, cosine) or len(kept) >= limit:
            return SelectionResult(
                kept_layers=tuple(kept),
                snr_db=snr,
                cosine=cosine,
                met=meets(snr, cosine),
                evaluations=evaluations,
                qdq=result,
            )
        kept.append(order[len(kept)])


def _score(reference: ReferenceEvaluator, candidate: onnx.ModelProto, simulate: bool) -> tuple[float, float]:
    """(SNR dB, cosine) of the candidate's worst output over the held-out batches."""
    report = reference.evaluate(candidate, simulate=simulate)
    worst = min(report.outputs, key=lambda o: (o.snr_db, o.cosine))
    return worst.snr_db, min(o.cosine for o in report.outputs)


def _layers_to_evaluate(
    model: onnx.ModelProto, quantized: tuple[str, ...], max_layers: int | None, prefer: Sequence[str] = ()
) -> list[str]:
    if max_layers is None or len(quantized) <= max_layers:
        return list(quantized)
    if prefer:
        wanted = dict.fromkeys([quantized[0], quantized[-1], *(n for n in prefer if n in set(quantized))])
        chosen_preferred = set(list(wanted)[:max_layers])
        return [n for n in quantized if n in chosen_preferred]
    index = GraphIndex(model.graph)
    # The TensorRT plan quantizes every layer the ONNX Runtime plan does; its weights are the proxy.
    plan_layers = {layer.node: layer for layer in plan_qdq(model).weights}
    noise: dict[str, float] = {}
    for node in quantized[1:-1]:
        layer = plan_layers[node]
        weight = index.weight_value(layer.weight).astype(np.float64)
        q, scale = quantize_weight(weight, layer.axis)
        shape = [-1 if a == layer.axis else 1 for a in range(weight.ndim)] if layer.axis is not None else []
        error = weight - q.astype(np.float64) * scale.astype(np.float64).reshape(shape)
        noise[node] = float(np.sum(error * error) / max(np.sum(weight * weight), 1e-30))
    ends = [quantized[0], quantized[-1]]
    chosen = set(ends[:max_layers]) | set(sorted(noise, key=lambda n: -noise[n])[: max(0, max_layers - 2)])
    return [n for n in quantized if n in chosen]


def _merged(base: SkipSpec, extra: frozenset[str]) -> SkipSpec:
    return SkipSpec(
        node_names=base.node_names | extra, op_types=base.op_types, first=base.first, last=base.last
    )


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def _check_stop(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise JobCancelled("sensitivity analysis was cancelled")
