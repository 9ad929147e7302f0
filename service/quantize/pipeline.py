"""FP32 model + calibration data -> calibrated Q/DQ model, calibration cache and evidence.

The chain: refuse a model in which the placement would put nothing in INT8 (BadInput, rather than
an "INT8" model without INT8 in it) -> pick the activation tensors the placement for ``plan.target``
needs ranges for -> stream the calibration samples through ONNX Runtime into fixed-size histograms
(two passes, order- and batch-independent) -> thresholds by the chosen method (``auto`` tries each
and keeps the most accurate on held-out samples) -> Q/DQ model -> accuracy vs FP32 on held-out
samples -> optional per-layer sensitivity and selective quantization. One histogram collection
serves every method, so ``auto`` costs one collection plus one evaluation per method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from service.accuracy.outputs import AccuracyReport, evaluate_with_onnxruntime
from service.accuracy.tasks import AccuracyTarget, TaskSpec
from service.calibration.algorithms import thresholds_from_histograms
from service.calibration.collect import collect_histograms
from service.calibration.trt_cache import calibration_cache_from_scales
from service.errors import BadInput
from service.quantize.placement import PlacementTarget
from service.quantize.qdq import TENSORRT_PLACEMENT
from service.quantize.search import CONCRETE_METHODS, SearchOutcome, SearchPlan, search_quantization
from service.quantize.sensitivity import rank_layer_sensitivity, select_layers_to_keep
from service.quantize.skip import SkipSpec
from service.quantize.targets import QdqPlacement, placement_for

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]
SensitivityMode = Literal["off", "rank", "auto"]
INT8_MAX = 127.0


@dataclass(frozen=True)
class QuantizationPlan:
    """What to do; the caller supplies the data."""

    method: str = "auto"  # auto (the accuracy search) | entropy | max | percentile | mse
    percentile: float = 99.99
    skip: tuple[str, ...] = ()
    sensitivity: SensitivityMode = "off"
    min_snr_db: float | None = None  # the bound for sensitivity "auto"
    min_cosine: float | None = None
    # Whose Q/DQ placement: "tensorrt" (TensorRT 10/11, TensorRT-RTX) or "onnxruntime" (its CPU
    # provider's integer kernels); the two models differ, see placement.py and ort_placement.py.
    target: PlacementTarget = "tensorrt"
    # The ONNX Runtime placement's weight range: 64 on CPUs whose U8S8 kernels saturate (cpu_isa.py).
    ort_weight_max: int | None = None
    task: TaskSpec | None = None  # None: guessed from the FP32 outputs
    accuracy_targets: tuple[AccuracyTarget, ...] = ()  # empty: the task's defaults


@dataclass(frozen=True)
class QuantizationOutcome:
    qdq_model: onnx.ModelProto
    method: str
    activation_amax: dict[str, float]
    calibration_cache: bytes
    accuracy: AccuracyReport | None
    method_accuracy: dict[str, dict[str, Any]] = field(default_factory=dict)
    sensitivity: list[dict[str, Any]] | None = None
    selection: dict[str, Any] | None = None
    kept_layers: tuple[str, ...] = ()
    quantized_nodes: tuple[str, ...] = ()
    placement: QdqPlacement = TENSORRT_PLACEMENT
    warnings: tuple[str, ...] = ()
    search: SearchOutcome | None = None

    @property
    def target(self) -> PlacementTarget:
        return self.placement.name

    @property
    def qdq_simulated(self) -> bool:
        """True when the accuracy was measured by simulating the Q/DQ in float (the target's GPU
        kernels cannot run here); False when the target's own integer kernels ran it."""
        return self.placement.simulates_qdq

    @property
    def target_met(self) -> bool | None:
        return self.search.target_met if self.search is not None else None

    def summary(self) -> dict[str, Any]:
        accuracy = self.accuracy.to_dict() if self.accuracy else None
        return {
            # The task metric and the verdict lead: they are what a user decides on.
            "task": accuracy["task"] if accuracy else None,
            "target_met": self.target_met,
            "accuracy_targets": [t.model_dump() for t in self.search.targets] if self.search else [],
            "int8_share": self.search.int8_share if self.search else None,
            "warnings": list(self.warnings),
            "method": self.method,
            "target": self.target,
            "calibrated_tensors": len(self.activation_amax),
            "quantized_nodes": len(self.quantized_nodes),
            "kept_layers": list(self.kept_layers),
            "accuracy": accuracy,
            "search": self.search.to_dict() if self.search else None,
            "method_accuracy": self.method_accuracy,
            "sensitivity": self.sensitivity,
            "selection": self.selection,
        }


class Progress:
    """Maps sub-step progress onto a slice of the job's progress bar."""

    def __init__(self, report: Callable[[float, str | None], None] | None) -> None:
        self.report = report

    def slice(self, start: float, end: float, phase: str) -> Callable[[int, int], None]:
        if self.report is not None:
            self.report(start, phase)

        def update(done: int, total: int) -> None:
            if self.report is not None and total > 0:
                self.report(start + (end - start) * min(done / total, 1.0), None)

        return update


def quantize_model(
    model: onnx.ModelProto,
    calibration_batches: Batches,
    calibration_samples: int,
    holdout_batches: Batches | None,
    plan: QuantizationPlan,
    *,
    progress: Callable[[float, str | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> QuantizationOutcome:
    """Calibrate and quantize ``model``; see the module docstring for the chain."""
    steps = Progress(progress)
    say = log or (lambda message: None)
    skip = SkipSpec.parse(list(plan.skip)) if plan.skip else None
    placement = placement_for(plan.target, ort_weight_max=plan.ort_weight_max)
    summary = placement.summary(model, skip)
    reason = summary.unquantizable_reason()
    if reason is not None:
        raise BadInput(f"nothing in this model can be quantized to INT8: {reason}.")
    if plan.method == "auto" and holdout_batches is None:
        raise BadInput(
            "method 'auto' searches for the configuration that meets the accuracy target on held-out "
            "samples, and none are left: give eval_set_id, raise holdout_fraction, or upload more samples."
        )
    tensors = list(summary.tensors_to_calibrate)
    say(f"calibrating {len(tensors)} activation tensors on {calibration_samples} samples")
    histograms = collect_histograms(
        model,
        calibration_batches,
        tensors,
        total_samples=calibration_samples,
        progress=steps.slice(0.0, 0.45, "calibrate"),
        should_stop=should_stop,
    )
    search: SearchOutcome | None = None
    if holdout_batches is None:
        amax = thresholds_from_histograms(histograms, plan.method, percentile=plan.percentile)  # type: ignore[arg-type]
        result = placement.qdq_model(model, amax, skip=skip)
        best, qdq, quantized, accuracy = plan.method, result.model, result.quantized_nodes, None
        method_accuracy: dict[str, dict[str, Any]] = {}
    else:
        full = plan.method == "auto"
        search = search_quantization(
            model,
            histograms,
            calibration_batches,
            holdout_batches,
            SearchPlan(
                methods=CONCRETE_METHODS if full else (plan.method,),
                percentile=plan.percentile,
                skip=skip,
                placement=placement,
                task=plan.task,
                targets=plan.accuracy_targets,
                per_tensor=full,
                # A named method is the user's choice; keeping layers is then what sensitivity asks for.
                keep_layers=full or bool(plan.accuracy_targets),
            ),
            progress=steps.slice(0.45, 0.8, "search"),
            should_stop=should_stop,
            log=say,
        )
        best, amax, accuracy = search.method, search.amax, search.accuracy
        qdq, quantized = search.qdq.model, search.qdq.quantized_nodes
        method_accuracy = {name: report.to_dict() for name, report in search.method_reports.items()}
        say(
            f"search chose '{best}' ({len(search.kept_layers)} layer(s) kept in float); target "
            f"{'met' if search.target_met else 'NOT met'}"
        )

    sensitivity: list[dict[str, Any]] | None = None
    selection_summary: dict[str, Any] | None = None
    kept: tuple[str, ...] = tuple(sorted(skip.resolve(model))) if skip else ()
    if search is not None:
        kept = tuple(sorted(set(kept) | set(search.kept_layers)))
    if plan.sensitivity != "off" and holdout_batches is not None:
        if search is not None and search.kept_layers:
            skip = SkipSpec.parse([*plan.skip, *search.kept_layers])
        ranking = rank_layer_sensitivity(
            model,
            amax,
            holdout_batches,
            skip=skip,
            placement=placement,
            progress=steps.slice(0.8, 0.9, "sensitivity"),
            should_stop=should_stop,
        )
        sensitivity = [entry.to_dict() for entry in ranking]
        if plan.sensitivity == "auto":
            selection = select_layers_to_keep(
                model,
                amax,
                holdout_batches,
                ranking,
                min_snr_db=plan.min_snr_db,
                min_cosine=plan.min_cosine,
                skip=skip,
                placement=placement,
                progress=steps.slice(0.9, 0.95, "selective"),
                should_stop=should_stop,
            )
            selection_summary = {k: v for k, v in selection.to_dict().items() if k != "qdq"}
            kept = tuple(sorted(set(kept) | set(selection.kept_layers)))
            say(
                f"selective quantization keeps {len(selection.kept_layers)} layer(s) out of INT8; "
                f"bound {'met' if selection.met else 'NOT met'} (SNR {selection.snr_db:.2f} dB)"
            )
            if selection.kept_layers:
                qdq, quantized = selection.qdq.model, selection.qdq.quantized_nodes
                accuracy = evaluate_with_onnxruntime(
                    model, qdq, holdout_batches(), task=plan.task, simulate=placement.simulates_qdq
                )
    # A met target is the verdict; the whole-output cosine advice only adds to a shortfall.
    advice = accuracy_warnings(accuracy, plan.method) if search is None or not search.target_met else ()
    warnings = (search.warnings if search is not None else ()) + advice
    for warning in warnings:
        say(f"warning: {warning}")
    if progress is not None:
        progress(0.95, "finalize")
    scales = {name: max(value, 1e-12) / INT8_MAX for name, value in amax.items()}
    return QuantizationOutcome(
        qdq_model=qdq,
        method=best,
        activation_amax=dict(amax),
        calibration_cache=calibration_cache_from_scales(scales),
        accuracy=accuracy,
        method_accuracy=method_accuracy,
        sensitivity=sensitivity,
        selection=selection_summary,
        kept_layers=kept,
        quantized_nodes=tuple(quantized),
        placement=placement,
        warnings=warnings,
        search=search,
    )


# Below this worst-output cosine on held-out samples, INT8 has visibly changed the model's answers.
ACCURACY_WARNING_COSINE = 0.99


def accuracy_warnings(accuracy: AccuracyReport | None, method: str) -> tuple[str, ...]:
    """Plain-language warnings about the held-out accuracy the chosen calibration reached."""
    if accuracy is None:
        return ("no held-out samples were left, so INT8 accuracy was not measured",)
    worst = accuracy.worst_cosine()
    if worst >= ACCURACY_WARNING_COSINE:
        return ()
    advice = (
        "try method 'auto', which keeps the most accurate of entropy, max, percentile and mse, "
        "or sensitivity 'auto' to keep the layers that cost most in higher precision"
        if method != "auto"
        else "try sensitivity 'auto' with a bound, or calibration samples closer to real inputs"
    )
    return (f"INT8 outputs reach only cosine {worst:.4f} against FP32 on held-out samples; {advice}",)
