"""One build, as a short chain of named steps run inside a job.

cache lookup -> load model -> prepare (calibrate + place Q/DQ for INT8 on FP32 models; FP16-type
the rest on strongly typed backends) -> store the exact ONNX handed to the backend -> backend build
-> layer report -> verify fusions against the static analysis -> accuracy evidence -> store the
engine atomically. Each step is a function of its inputs so it can be tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from service.accuracy.tasks import AccuracyTarget, TaskSpec
from service.backends.base import Backend, BackendInfo, BuildSpec, BuiltEngine, LayerReport
from service.backends.capabilities import capabilities_of
from service.backends.registry import get_backend
from service.builds.auto_precision import Int8Evidence, choose_precision, fallback_precision
from service.builds.fusion_report import verify_fusions
from service.builds.job_params import AutoChoiceParams, BuildJobParams
from service.builds.speed import SpeedCheck, int8_speed_vs_fp32
from service.builds.storage import BuildOutput, BuildStorage
from service.catalog.build_report import BuildReport
from service.catalog.engine_keys import BuildConfig, EngineKey
from service.jobs.runner import JobContext
from service.onnx_graph.fusions import analyze_fusions
from service.onnx_graph.inspect import model_inputs
from service.quantize.fp16 import fp16_model_from
from service.quantize.inputs import batch_size_for, calibration_inputs
from service.quantize.pipeline import QuantizationOutcome, QuantizationPlan, quantize_model
from service.quantize.placement import PlacementTarget


@dataclass(frozen=True)
class PreparedModel:
    """The exact ONNX the backend builds, and how it was derived."""

    model: onnx.ModelProto
    steps: tuple[str, ...]
    keep_layers: tuple[str, ...]
    quantization: QuantizationOutcome | None = None
    sample: dict[str, np.ndarray] | None = None  # one calibration input, for the speed check


def layer_counts(report: LayerReport) -> dict[str, int]:
    counts = {"int8": 0, "fp16": 0, "fp32": 0, "mixed": 0, "other": 0}
    for layer in report.layers:
        if not layer.is_reformat:
            counts[layer.precision] = counts.get(layer.precision, 0) + 1
    counts["reformat"] = report.reformat_count
    counts["total"] = len(report.layers)
    return counts


def layer_report_dict(report: LayerReport) -> dict[str, Any]:
    return {
        "source": report.source,
        "layers": [
            {
                "name": layer.name,
                "type": layer.type,
                "precision": layer.precision,
                "input_dtypes": list(layer.input_dtypes),
                "output_dtypes": list(layer.output_dtypes),
                "onnx_nodes": list(layer.onnx_nodes),
                "is_reformat": layer.is_reformat,
            }
            for layer in report.layers
        ],
    }


class BuildPipeline:
    """Runs build jobs: ``handle(ctx)`` is registered with the job runner for kind ``build``."""

    def __init__(self, storage: BuildStorage) -> None:
        self.storage = storage

    def handle(self, ctx: JobContext) -> dict[str, Any]:
        params = BuildJobParams.from_json(ctx.params)
        if params.auto is not None:
            return self.choose_and_build(ctx, params.key, params.auto)
        return self.build_one(ctx, params.key)

    def choose_and_build(
        self, ctx: JobContext, int8_key: EngineKey, auto: AutoChoiceParams
    ) -> dict[str, Any]:
        """``precision: "auto"``: the INT8 engine first, then the fallback when INT8 is not the answer."""
        fallback_key = auto.fallback_key
        int8_result: dict[str, Any] | None = None
        if auto.int8_evidence is not None:  # the INT8 engine was in the cache when the request came
            evidence = auto.int8_evidence
        else:
            # No cache check: a hit here would carry no evidence; rebuilding is the rare race's cost.
            int8_result = self.build_one(ctx, int8_key, use_cache=False)
            evidence = Int8Evidence.from_report(int8_result["engine_id"], int8_result)
        fallback = fallback_precision(fallback_key.backend.name)
        choice = choose_precision(evidence, fallback)
        ctx.log(f"precision auto -> {choice.chosen}: {choice.reason}")
        if choice.chosen == "int8":
            assert int8_result is not None  # evidence from the cache only comes when INT8 lost
            return {**int8_result, "precision": "int8", "precision_choice": choice.to_dict()}
        ctx.check_cancelled()
        result = self.build_one(ctx, fallback_key)
        # FP32 is the reference, so it meets any target; FP16 is not measured on this host.
        target_met = True if fallback == "fp32" else None
        return {
            **result,
            "precision": fallback,
            "precision_choice": choice.to_dict(),
            "target_met": target_met,
            "warnings": [f"precision auto delivers {fallback.upper()}, not INT8: {choice.reason}"],
        }

    def build_one(self, ctx: JobContext, key: EngineKey, *, use_cache: bool = True) -> dict[str, Any]:
        """Build and store the engine of ``key`` (or name the cached one); returns the job result."""
        cached = self.storage.cached_engine_id(key.digest) if use_cache else None
        if cached is not None:  # an identical build finished between the request and this job
            ctx.log("engine already in the cache")
            return {"engine_id": cached, "cache": "hit"}
        backend = get_backend(key.backend.name)
        ctx.phase("load", 0.02)
        model = self.storage.load_model(key.model_id)
        prepared = self.prepare(ctx, model, key, backend.describe())
        ctx.check_cancelled()
        ctx.phase("build", 0.8)
        built_model = prepared.model.SerializeToString()
        built = backend.build(built_model, self.build_spec(key.config, prepared))
        ctx.log(
            f"{backend.name} built a {len(built.engine_bytes)}-byte engine in {built.build_seconds:.2f} s"
        )
        ctx.check_cancelled()
        ctx.phase("verify", 0.9)
        report = self.evidence(model, prepared, built)
        speed = self.speed_check(ctx, backend, model, built, key, prepared)
        if speed is not None:
            report = report.with_speed(speed.to_dict(), speed.warning)
            if speed.warning:
                ctx.log(f"warning: {speed.warning}")
        ctx.phase("store", 0.97)
        engine_id = self.storage.store(
            BuildOutput(
                key=key,
                built_model=built_model,
                built_model_name=f"{key.model_id[:12]}-{key.config.precision}-{key.backend.name}.onnx",
                engine_bytes=built.engine_bytes,
                file_extension=built.file_extension,
                build_seconds=built.build_seconds,
                report=report.to_dict(),
                calibration_cache=prepared.quantization.calibration_cache if prepared.quantization else None,
            )
        )
        return {
            "engine_id": engine_id,
            "cache": "miss",
            "build_seconds": built.build_seconds,
            "task": report.task,
            "target_met": report.target_met,
            "int8_share": report.int8_share,
            "speedup_vs_fp32": speed.speedup_vs_fp32 if speed is not None else None,
            "speed": speed.to_dict() if speed is not None else None,
            "warnings": list(report.warnings),
        }

    @staticmethod
    def speed_check(
        ctx: JobContext,
        backend: Backend,
        model: onnx.ModelProto,
        built: BuiltEngine,
        key: EngineKey,
        prepared: PreparedModel,
    ) -> SpeedCheck | None:
        """INT8 against FP32 on a calibration sample, where the backend runs on this host."""
        if key.config.precision != "int8" or prepared.sample is None or not backend.available().can_run:
            return None
        ctx.phase("speed", 0.93)
        speed = int8_speed_vs_fp32(
            backend, model.SerializeToString(), built.engine_bytes, key.config.shape_map(), prepared.sample
        )
        ctx.log(
            f"INT8 {speed.int8_ms:.2f} ms vs FP32 {speed.fp32_ms:.2f} ms per run on {speed.device} "
            f"(speedup {speed.speedup_vs_fp32:.2f}x)"
        )
        return speed

    def prepare(
        self,
        ctx: JobContext,
        model: onnx.ModelProto,
        key: EngineKey,
        backend: BackendInfo,
    ) -> PreparedModel:
        config = key.config
        steps: list[str] = []
        keep = tuple(config.keep)
        outcome: QuantizationOutcome | None = None
        sample: dict[str, np.ndarray] | None = None
        prepared = model
        if config.precision == "int8" and config.calibration is not None:
            ctx.phase("calibrate", 0.05)
            outcome, sample = self.calibrate(ctx, model, key)
            keep = tuple(sorted(set(keep) | set(outcome.kept_layers)))
            if backend.strongly_typed:
                prepared = outcome.qdq_model
                steps.append(f"calibrated ({outcome.method}) and placed Q/DQ")
            else:
                steps.append(f"calibrated ({outcome.method}); TensorRT reads the calibration cache")
        elif config.precision == "int8":
            steps.append("explicitly quantized model used as uploaded")
        # FP16 typing is for TensorRT-family strongly typed builders; ONNX Runtime's CPU kernels gain
        # nothing from FP16, so its hybrid engines keep FP32 outside INT8.
        if backend.strongly_typed and config.precision in ("int8", "fp16") and backend.capabilities.fp16:
            ctx.phase("fp16", 0.75)
            prepared = fp16_model_from(prepared)
            steps.append("layers outside INT8 typed FP16")
        return PreparedModel(
            model=prepared, steps=tuple(steps), keep_layers=keep, quantization=outcome, sample=sample
        )

    def calibrate(
        self, ctx: JobContext, model: onnx.ModelProto, key: EngineKey
    ) -> tuple[QuantizationOutcome, dict[str, np.ndarray]]:
        """The quantization outcome, and the first calibration sample (for the speed check).

        The held-out set is the key's own (``config.eval_set_id``): it is part of what the key builds."""
        options = key.config.calibration
        assert options is not None and key.calibration_set_id is not None  # guaranteed by prepare()
        inputs = model_inputs(model)
        dataset, binding = self.storage.calibration_set(key.calibration_set_id, inputs)
        eval_id = key.config.eval_set_id
        eval_set, eval_binding = self.storage.calibration_set(eval_id, inputs) if eval_id else (None, None)
        data = calibration_inputs(
            inputs,
            dataset,
            binding,
            eval_set=eval_set,
            eval_binding=eval_binding,
            holdout_fraction=options.holdout_fraction,
            max_samples=options.max_samples,
            holdout_seed=options.holdout_seed,
        )
        ctx.log(
            f"{data.calibration_samples} calibration and {data.holdout_samples} held-out samples"
            + (f" (drawn with seed {data.holdout_seed})" if data.holdout_seed is not None else "")
        )
        target = placement_target(key.backend.name)
        plan = QuantizationPlan(
            method=options.method,
            percentile=options.percentile,
            skip=key.config.keep,
            target=target,
            task=TaskSpec.model_validate(options.task) if options.task else None,
            accuracy_targets=tuple(AccuracyTarget.model_validate(t) for t in options.accuracy_targets),
        )
        outcome = quantize_model(
            model,
            data.calibration,
            data.calibration_samples,
            data.holdout,
            plan,
            progress=lambda fraction, phase: ctx.progress(0.05 + 0.65 * fraction, phase),
            should_stop=ctx.should_stop,
            log=ctx.log,
        )
        first = next(iter(data.calibration()))
        _, fixed_batch = batch_size_for(inputs)  # a fixed batch dimension takes the whole batch
        return outcome, {
            name: np.ascontiguousarray(np.asarray(v) if fixed_batch else np.asarray(v)[:1])
            for name, v in first.items()
        }

    @staticmethod
    def build_spec(config: BuildConfig, prepared: PreparedModel) -> BuildSpec:
        outcome = prepared.quantization
        return BuildSpec(
            precision=config.precision,
            shapes=config.shape_map(),
            keep_layers=prepared.keep_layers,
            calibration_cache=outcome.calibration_cache if outcome else None,
            workspace_bytes=config.workspace_bytes,
        )

    @staticmethod
    def evidence(
        model: onnx.ModelProto,
        prepared: PreparedModel,
        built: BuiltEngine,
    ) -> BuildReport:
        """The build's evidence: fusions verified against the engine's layers, accuracy, preparation."""
        analysis = analyze_fusions(model)
        verification = verify_fusions(analysis, built.layer_report, backend=built.info.name)
        accuracy: dict[str, Any] | None = None
        outcome = prepared.quantization
        if outcome is not None and outcome.accuracy is not None:
            simulated = outcome.qdq_simulated
            accuracy = {
                "measured_with": "onnxruntime (CPU)"
                + (
                    ", Q/DQ simulated in float as the GPU computes it"
                    if simulated
                    else ", this engine's kernels"
                ),
                "compared": "FP32 model vs the Q/DQ model built into this engine, on held-out samples",
                **outcome.accuracy.to_dict(),
            }
        return BuildReport(
            task=accuracy["task"] if accuracy else None,
            target_met=outcome.target_met if outcome is not None else None,
            int8_share=outcome.search.int8_share if outcome is not None and outcome.search else None,
            warnings=tuple(outcome.warnings) if outcome is not None else (),
            backend={
                "name": built.info.name,
                "version": built.info.version,
                "device": built.info.device,
                "compute_capability": built.info.compute_capability,
            },
            preparation=tuple(prepared.steps),
            kept_layers=tuple(prepared.keep_layers),
            layer_counts=layer_counts(built.layer_report),
            layers=layer_report_dict(built.layer_report),
            fusions=verification.to_dict(),
            accuracy=accuracy,
            quantization=prepared.quantization.summary() if prepared.quantization else None,
            build_log_tail=tuple(built.build_log.splitlines()[-60:]),
        )


def placement_target(backend_name: str) -> PlacementTarget:
    """Whose Q/DQ placement a backend's INT8 build gets: ONNX Runtime's own for ``onnxruntime``
    (its CPU integer kernels need whole node units), TensorRT's for every TensorRT-family backend."""
    return capabilities_of(backend_name).placement_target
