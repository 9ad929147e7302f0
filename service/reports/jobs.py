"""Report jobs: ``benchmark``, ``evaluation`` and ``comparison``, checked when submitted, run as jobs.

Submission (``submit_*``) checks everything that can be known wrong before a job exists, so a bad
request is a 4xx at once: unknown engine or set (404), an engine whose backend cannot run here (409,
naming one that can), engines of different models or a set that does not fit the model (400). The
handlers lease the engine's warm runner from the :class:`RunnerPool` (shared with live inference, so
a benchmark on an engine that also serves traffic measures that contention too) and store the
report's ``to_dict()`` as the job result. Reports are job records: ``GET /v1/reports/{id}``.

The composition root (:func:`service.services.open_services`) creates the one :class:`ReportJobs` and
registers its handlers for the report job kinds.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.backends.base import BackendInfo, IOSpec
from service.backends.capabilities import capabilities_of
from service.catalog.build_report import BuildReport
from service.catalog.calibration_sets import CalibrationCatalog
from service.catalog.engines import EngineCache, EngineRecord
from service.catalog.models import ModelCatalog
from service.errors import BadInput, EngineNotRunnableHere
from service.jobs.records import JobRecord, JobStore
from service.jobs.runner import JobContext, JobRunner
from service.reports.benchmark import BENCHMARK_KIND, BenchmarkReport, MeasuredEngine, benchmark_runner
from service.reports.benchmark_shapes import benchmark_shapes
from service.reports.comparison import (
    COMPARISON_KIND,
    AccuracySummary,
    ComparisonEntry,
    check_comparable,
    compare_engines,
    summarize_accuracy,
)
from service.reports.evaluation import (
    EVALUATION_KIND,
    EvaluationData,
    EvaluationReport,
    evaluate_engine,
    reference_model_for,
)
from service.reports.latency import BenchmarkConfig
from service.reports.run_conditions import ConditionsWatch
from service.reports.synthetic_inputs import UNBOUNDED_TENSORS, TensorBudget, check_feed_sizes
from service.serving.runnable import BackendLookup, default_backend_lookup, require_runnable
from service.serving.runner_pool import RunnerPool

logger = logging.getLogger(__name__)

REPORT_KINDS = (BENCHMARK_KIND, EVALUATION_KIND, COMPARISON_KIND)
_RECENT_EVALUATIONS = 500


@dataclass
class ReportJobs:
    """The report job handlers and their submission checks, over the service's stores and runner pool."""

    engines: EngineCache
    models: ModelCatalog
    calibration_sets: CalibrationCatalog
    jobs: JobStore
    runner: JobRunner
    pool: RunnerPool
    backend_for: BackendLookup = default_backend_lookup
    budget: TensorBudget = UNBOUNDED_TENSORS

    # Submission ----------------------------------------------------------------------------------

    def submit_benchmark(self, engine_id: str, config: BenchmarkConfig, *, owner: str | None) -> JobRecord:
        record = self.engines.get(engine_id)
        require_runnable(record, self.engines, self.backend_for)
        config = self.with_shapes(record, config)
        self._check_input_sizes(record, config)
        params = {"engine_id": record.id, "config": config.to_dict()}
        return self.runner.submit(BENCHMARK_KIND, params, owner=owner)[0]

    def with_shapes(self, record: EngineRecord, config: BenchmarkConfig) -> BenchmarkConfig:
        """``config`` with a size for every dynamic axis of the engine's inputs, or BadInput naming them."""
        inputs = self.models.get(record.built_model_id).info.inputs
        calibration: dict[str, tuple[int, ...]] = {}
        if record.calibration_set_id is not None:
            info = self.calibration_sets.get(record.calibration_set_id).info
            stored = {item.name: item.shape for item in info.inputs}
            for model_input, array in self.calibration_sets.bind(record.calibration_set_id, inputs).items():
                calibration[model_input] = stored[array]
        shapes = benchmark_shapes(
            inputs,
            config.shape_map(),
            build_shapes=record.build_config.shape_map(),
            calibration_shapes=calibration,
            engine_id=record.id,
        )
        return dataclasses.replace(config, shapes=tuple(sorted(shapes.items())))

    def submit_evaluation(
        self, engine_id: str, eval_set_id: str, max_samples: int | None, *, owner: str | None
    ) -> JobRecord:
        record = self.engines.get(engine_id)
        require_runnable(record, self.engines, self.backend_for)
        eval_set_id = self.calibration_sets.get(eval_set_id).id
        self.calibration_sets.bind(eval_set_id, self.models.get(record.model_id).info.inputs)
        params = {"engine_id": record.id, "eval_set_id": eval_set_id, "max_samples": max_samples}
        return self.runner.submit(EVALUATION_KIND, params, owner=owner)[0]

    def submit_comparison(
        self,
        engine_ids: Sequence[str],
        config: BenchmarkConfig,
        eval_set_id: str | None,
        *,
        owner: str | None,
    ) -> JobRecord:
        records = [self.engines.get(engine_id) for engine_id in engine_ids]
        for record in records:
            self._check_input_sizes(record, config)
        model_id = check_comparable(records, {r.model_id: self.root_model_id(r.model_id) for r in records})
        # Checked now (400 naming the dynamic axes), chosen per engine: each may have its own build range.
        shapes = {r.id: self.with_shapes(r, config).to_dict()["shapes"] for r in records if self._runnable(r)}
        if eval_set_id is not None:
            eval_set_id = self.calibration_sets.get(eval_set_id).id
            self.calibration_sets.bind(eval_set_id, self.models.get(model_id).info.inputs)
        params = {
            "engine_ids": [record.id for record in records],
            "model_id": model_id,
            "config": config.to_dict(),
            "engine_shapes": shapes,
            "eval_set_id": eval_set_id,
        }
        return self.runner.submit(COMPARISON_KIND, params, owner=owner)[0]

    def _runnable(self, record: EngineRecord) -> bool:
        try:
            require_runnable(record, self.engines, self.backend_for)
        except EngineNotRunnableHere:
            return False
        return True

    def root_model_id(self, model_id: str) -> str:
        """The FP32 model a Q/DQ model was quantized from (following parents), else the model itself."""
        current = self.models.get(model_id)
        seen = {current.id}
        while current.info.quantization.explicit and current.parent_id and current.parent_id not in seen:
            current = self.models.get(current.parent_id)
            seen.add(current.id)
        return current.id if not current.info.quantization.explicit else model_id

    # Handlers ------------------------------------------------------------------------------------

    def benchmark(self, ctx: JobContext) -> dict[str, Any]:
        record = self.engines.get(ctx.params["engine_id"])
        config = BenchmarkConfig.from_dict(ctx.params["config"])
        report = self._benchmark(ctx, record, config, 0.0, 1.0)
        return report.to_dict()

    def evaluation(self, ctx: JobContext) -> dict[str, Any]:
        record = self.engines.get(ctx.params["engine_id"])
        report = self._evaluate(
            ctx, record, ctx.params["eval_set_id"], ctx.params.get("max_samples"), 0.0, 1.0
        )
        return report.to_dict()

    def comparison(self, ctx: JobContext) -> dict[str, Any]:
        params = ctx.params
        config = BenchmarkConfig.from_dict(params["config"])
        eval_set_id: str | None = params.get("eval_set_id")
        engine_ids: list[str] = params["engine_ids"]
        share = 1.0 / len(engine_ids)
        entries: list[ComparisonEntry] = []
        for index, engine_id in enumerate(engine_ids):
            ctx.check_cancelled()
            record = self.engines.get(engine_id)
            start = index * share
            try:
                require_runnable(record, self.engines, self.backend_for)
            except EngineNotRunnableHere as exc:
                ctx.log(f"engine {engine_id[:12]}: not measured ({exc.message})")
                reason = f"its backend ({record.backend}) cannot run on this host"
                entries.append(ComparisonEntry(record, None, reason, self._stored_accuracy(record)))
                continue
            bench_share = share / 2 if eval_set_id else share
            engine_config = BenchmarkConfig.from_dict(
                {**params["config"], "shapes": params.get("engine_shapes", {}).get(record.id, {})}
            )
            benchmark = self._benchmark(ctx, record, engine_config, start, bench_share)
            accuracy: AccuracySummary | None
            if eval_set_id is not None:
                evaluation = self._evaluate(ctx, record, eval_set_id, None, start + bench_share, bench_share)
                accuracy = summarize_accuracy(
                    evaluation.accuracy, f"evaluation on set {eval_set_id[:12]} run for this comparison"
                )
            else:
                accuracy = self._stored_accuracy(record)
            entries.append(ComparisonEntry(record, benchmark, "", accuracy))
        ctx.progress(1.0, "report")
        return compare_engines(params["model_id"], entries, config.batch_sizes).to_dict()

    def _check_input_sizes(self, record: EngineRecord, config: BenchmarkConfig) -> None:
        """Refuse at submission a benchmark whose synthetic inputs would be over the budget."""
        inputs = self.models.get(record.model_id).info.inputs
        specs = [IOSpec(spec.name, spec.dtype, spec.shape) for spec in inputs]
        shapes = record.build_config.shape_map()
        check_feed_sizes(
            specs, config.batch_sizes, shapes=shapes, sizes=config.shape_map(), budget=self.budget
        )

    # Steps ---------------------------------------------------------------------------------------

    def _runtime(self, record: EngineRecord) -> BackendInfo:
        return self.backend_for(record.backend).describe()

    def _benchmark(
        self, ctx: JobContext, record: EngineRecord, config: BenchmarkConfig, start: float, share: float
    ) -> BenchmarkReport:
        ctx.phase(f"load {record.id[:12]}", start)
        watch = ConditionsWatch(
            lambda: self.jobs.running_elsewhere(ctx.job_id), exclusive=ctx.exclusive, waited_s=ctx.waited_s
        )
        with self.pool.lease(record.id) as runner:
            ctx.phase(f"benchmark {record.id[:12]}", start)
            report = benchmark_runner(
                record,
                self._runtime(record),
                runner,
                config,
                progress=lambda fraction: ctx.progress(start + share * fraction),
                should_stop=ctx.should_stop,
                budget=self.budget,
                watch=watch,
            )
        for result in report.results:
            latency = result.latency
            ctx.log(
                f"engine {record.id[:12]} batch {result.batch_size}: p50 {latency.p50_ms:.3f} ms, p99 "
                f"{latency.p99_ms:.3f} ms, {latency.throughput:.1f} inferences/s "
                f"({report.engine.measured_on})"
            )
        for skipped in report.measurement.skipped:
            ctx.log(f"engine {record.id[:12]}: {skipped.reason}")
        if not report.results:  # a report never succeeds empty
            reasons = "; ".join(s.reason for s in report.measurement.skipped) or "nothing was measured"
            raise BadInput(f"Engine {record.id} measured no batch size: {reasons}.")
        conditions = report.conditions
        if conditions is not None and conditions.warning:
            ctx.log(f"engine {record.id[:12]}: latency may be distorted: {conditions.warning}")
        return report

    def _evaluate(
        self,
        ctx: JobContext,
        record: EngineRecord,
        eval_set_id: str,
        max_samples: int | None,
        start: float,
        share: float,
    ) -> EvaluationReport:
        ctx.phase(f"evaluate {record.id[:12]}", start)
        reference = reference_model_for(record, self.models)
        dataset = self.calibration_sets.open(eval_set_id)
        binding = self.calibration_sets.bind(eval_set_id, self.models.get(record.model_id).info.inputs)
        data = EvaluationData(
            set_id=eval_set_id,
            samples=dataset.samples,
            batches=lambda batch_size, stop: dataset.batches(batch_size, stop=stop, bind=binding),
        )
        built = (
            self.models.load(record.built_model_id)
            if capabilities_of(record.backend).engine_is_onnx
            else None
        )
        with self.pool.lease(record.id) as runner:
            report = evaluate_engine(
                runner,
                MeasuredEngine.from_record(record, self._runtime(record)),
                reference,
                data,
                max_samples=max_samples,
                built_model=built,
                progress=lambda fraction: ctx.progress(start + share * fraction),
                should_stop=ctx.should_stop,
            )
        ctx.log(
            f"engine {record.id[:12]}: evaluated on {report.samples} sample(s) against "
            f"{reference.description}"
        )
        return report

    def _stored_accuracy(self, record: EngineRecord) -> AccuracySummary | None:
        """The newest evaluation report of the engine, else the build's own accuracy check."""
        for job in self.jobs.list(kind=EVALUATION_KIND, limit=_RECENT_EVALUATIONS):
            if job.status == "succeeded" and job.params.get("engine_id") == record.id and job.result:
                return summarize_accuracy(job.result.get("accuracy", {}), f"evaluation report {job.id}")
        built_check = BuildReport.from_dict(record.report).accuracy
        if built_check is not None:
            compared = built_check.get("compared") or "FP32 model vs the Q/DQ model, on held-out samples"
            return summarize_accuracy(built_check, f"the build's accuracy check ({compared})")
        return None
