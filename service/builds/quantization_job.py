"""The quantization job: FP32 model + calibration set -> stored Q/DQ model, calibration cache, evidence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.builds.quantization_params import QuantizationJobParams
from service.catalog.calibration_sets import CalibrationCatalog
from service.catalog.models import ModelCatalog
from service.jobs.runner import JobContext
from service.onnx_graph.inspect import model_inputs
from service.quantize.inputs import calibration_inputs
from service.quantize.pipeline import QuantizationPlan, quantize_model
from service.store.blobs import BlobStore

QUANTIZATION_JOB = "quantization"


@dataclass
class QuantizationJob:
    models: ModelCatalog
    calibration_sets: CalibrationCatalog
    artifacts: BlobStore

    def handle(self, ctx: JobContext) -> dict[str, Any]:
        params = QuantizationJobParams.from_json(ctx.params)
        ctx.phase("load", 0.01)
        record = self.models.get(params.model_id)
        model = self.models.load(record.id)
        inputs = model_inputs(model)
        set_id, eval_id = params.calibration_set_id, params.eval_set_id
        data = calibration_inputs(
            inputs,
            self.calibration_sets.open(set_id),
            self.calibration_sets.bind(set_id, inputs),
            eval_set=self.calibration_sets.open(eval_id) if eval_id else None,
            eval_binding=self.calibration_sets.bind(eval_id, inputs) if eval_id else None,
            holdout_fraction=params.holdout_fraction,
            max_samples=params.max_samples,
            holdout_seed=params.holdout_seed,
        )
        ctx.log(
            f"{data.calibration_samples} calibration and {data.holdout_samples} held-out samples, "
            f"batch size {data.batch_size}"
            + (
                f"; held-out samples drawn with seed {data.holdout_seed}"
                if data.holdout_seed is not None
                else ""
            )
        )
        plan = QuantizationPlan(
            method=params.method,
            percentile=params.percentile,
            skip=params.skip,
            sensitivity=params.sensitivity,
            min_snr_db=params.min_snr_db,
            min_cosine=params.min_cosine,
            target=params.target,
            task=params.task or record.task,
            accuracy_targets=params.accuracy_targets,
        )
        outcome = quantize_model(
            model,
            data.calibration,
            data.calibration_samples,
            data.holdout,
            plan,
            progress=ctx.progress,
            should_stop=ctx.should_stop,
            log=ctx.log,
        )
        ctx.check_cancelled()
        qdq_record, _ = self.models.add_model(
            outcome.qdq_model,
            f"{record.name.removesuffix('.onnx')}.int8-qdq{outcome.placement.artifact_suffix}.onnx",
            source="quantization",
            parent_id=record.id,
        )
        cache = self.artifacts.put_bytes(outcome.calibration_cache)
        ctx.log(f"Q/DQ model {qdq_record.id}; calibration cache {cache.sha256}")
        return {
            "qdq_model_id": qdq_record.id,
            "calibration_cache_sha256": cache.sha256,
            "calibration_samples": data.calibration_samples,
            "holdout_samples": data.holdout_samples,
            "holdout_seed": data.holdout_seed,
            **outcome.summary(),
        }
