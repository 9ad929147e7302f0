"""Reports: start benchmarks, evaluations and comparisons; read them as JSON, HTML or PNG."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.api.deps import PrincipalDep, ServicesDep
from service.api.jobs_common import JobDocument, JobPublic, job_public
from service.api.tenancy import cancel_owned, owned_engine, owned_set
from service.errors import Conflict, NotFound
from service.jobs.records import JobRecord
from service.reports.benchmark import BENCHMARK_KIND, BenchmarkReport
from service.reports.comparison import COMPARISON_KIND, MAX_ENGINES, ComparisonReport
from service.reports.evaluation import EVALUATION_KIND, EvaluationReport
from service.reports.jobs import REPORT_KINDS
from service.reports.latency import MAX_BATCH, MAX_CONCURRENCY, MAX_DURATION_S, MAX_ITERATIONS, MAX_WARMUP
from service.reports.latency import BenchmarkConfig as BenchmarkConfigValue
from service.services import Services
from service.store.owners import Principal

router = APIRouter(tags=["reports"])


class BenchmarkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1, max_length=16)
    warmup: int = Field(default=10, ge=0, le=MAX_WARMUP)
    iterations: int | None = Field(default=None, ge=1, le=MAX_ITERATIONS)
    duration_s: float | None = Field(default=None, gt=0, le=MAX_DURATION_S)
    concurrency: int = Field(default=1, ge=1, le=MAX_CONCURRENCY)
    shapes: dict[str, list[int]] = Field(
        default_factory=dict,
        description="Input shape per input name, for engines with dynamic axes besides the batch axis "
        '(e.g. {"images": [1, 3, 640, 640]}); the batch axis is replaced by each batch size. Default: the '
        "engine's build shape range (opt), else its calibration set's sample shape; without either, 400 "
        "names the dynamic axes.",
        examples=[{"images": [1, 3, 640, 640]}],
    )

    @model_validator(mode="after")
    def _one_bound(self) -> BenchmarkOptions:
        if self.iterations is not None and self.duration_s is not None:
            raise ValueError("give iterations or duration_s, not both")
        if any(not 1 <= b <= MAX_BATCH for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be from 1 to {MAX_BATCH}")
        return self

    def to_domain(self) -> BenchmarkConfigValue:
        iterations = self.iterations if self.iterations is not None or self.duration_s is not None else 100
        return BenchmarkConfigValue(
            batch_sizes=tuple(self.batch_sizes),
            warmup=self.warmup,
            iterations=iterations,
            duration_s=self.duration_s,
            concurrency=self.concurrency,
            shapes=tuple(sorted((name, tuple(dims)) for name, dims in self.shapes.items())),
        )


class EvaluationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eval_set_id: str
    max_samples: int | None = Field(default=None, ge=1)


class ComparisonCreate(BenchmarkOptions):
    engine_ids: list[str] = Field(min_length=2, max_length=MAX_ENGINES)
    eval_set_id: str | None = Field(
        default=None, description="Evaluate every runnable engine on this set too."
    )


class ReportAccepted(BaseModel):
    id: str
    kind: str
    status: str


def _accepted(record: JobRecord) -> JSONResponse:
    return JSONResponse(
        status_code=202, content={"id": record.id, "kind": record.kind, "status": record.status}
    )


def _report_record(services: Services, principal: Principal, report_id: str) -> JobRecord:
    missing = f"No report with id '{report_id}'. List reports with GET /v1/reports."
    record = services.jobs.get(services.owners.resolve("job", report_id, principal, missing=missing))
    if record.kind not in REPORT_KINDS:
        raise NotFound(f"No report with id '{report_id}'. List reports with GET /v1/reports.")
    return record


def _finished(record: JobRecord) -> dict[str, Any]:
    if record.status == "succeeded" and record.result is not None:
        return record.result
    if record.status in ("queued", "running"):
        raise Conflict(
            f"Report {record.id} is {record.status} ({record.progress:.0%} done); fetch it once GET "
            f"/v1/reports/{record.id} says succeeded."
        )
    raise Conflict(
        f"Report {record.id} {record.status} and has nothing to show: {record.error or 'no result'}."
    )


@router.post("/v1/engines/{engine_id}/benchmark", status_code=202, response_model=ReportAccepted)
async def create_benchmark(
    engine_id: str, body: BenchmarkOptions, services: ServicesDep, principal: PrincipalDep
) -> JSONResponse:
    """Measure the engine's latency and throughput per batch size; follow it with GET /v1/reports/{id}."""
    jobs = services.report_jobs
    engine_id = (await run_in_threadpool(owned_engine, services, principal, engine_id)).id
    record = await run_in_threadpool(
        jobs.submit_benchmark, engine_id, body.to_domain(), owner=principal.owner
    )
    return _accepted(record)


@router.post("/v1/engines/{engine_id}/evaluate", status_code=202, response_model=ReportAccepted)
async def create_evaluation(
    engine_id: str, body: EvaluationCreate, services: ServicesDep, principal: PrincipalDep
) -> JSONResponse:
    """Compare the engine's outputs with its FP32 reference on a stored set, with per-layer deltas."""
    jobs = services.report_jobs
    engine_id = (await run_in_threadpool(owned_engine, services, principal, engine_id)).id
    eval_set_id = (await run_in_threadpool(owned_set, services, principal, body.eval_set_id)).id
    record = await run_in_threadpool(
        jobs.submit_evaluation, engine_id, eval_set_id, body.max_samples, owner=principal.owner
    )
    return _accepted(record)


@router.post("/v1/reports/comparison", status_code=202, response_model=ReportAccepted)
async def create_comparison(
    body: ComparisonCreate, services: ServicesDep, principal: PrincipalDep
) -> JSONResponse:
    """Benchmark engines of one model side by side (e.g. FP32, FP16, INT8) with accuracy and speedup."""
    jobs = services.report_jobs
    engine_ids, eval_set_id = await run_in_threadpool(_owned_comparison, body, services, principal)
    record = await run_in_threadpool(
        jobs.submit_comparison, engine_ids, body.to_domain(), eval_set_id, owner=principal.owner
    )
    return _accepted(record)


def _owned_comparison(
    body: ComparisonCreate, services: Services, principal: Principal
) -> tuple[list[str], str | None]:
    """The full ids of the caller's own engines and set named in a comparison request."""
    engine_ids = [owned_engine(services, principal, engine_id).id for engine_id in body.engine_ids]
    eval_set_id = owned_set(services, principal, body.eval_set_id).id if body.eval_set_id else None
    return engine_ids, eval_set_id


@router.get("/v1/reports", response_model=list[JobPublic])
def list_reports(
    services: ServicesDep,
    principal: PrincipalDep,
    kind: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[JobDocument]:
    """Recent report jobs, newest first (filter by `kind`: benchmark, evaluation, comparison)."""
    if kind is not None and kind not in REPORT_KINDS:
        raise NotFound(f"No report kind '{kind}'; the kinds are {', '.join(REPORT_KINDS)}.")
    kinds = (kind,) if kind else REPORT_KINDS
    records = [r for k in kinds for r in services.jobs.list(kind=k, limit=limit, principal=principal)]
    records.sort(key=lambda r: r.created_at, reverse=True)
    return [job_public(r, services.engines, log_lines=5) for r in records[:limit]]


@router.get("/v1/reports/{report_id}.html", response_class=HTMLResponse)
def read_report_html(report_id: str, services: ServicesDep, principal: PrincipalDep) -> HTMLResponse:
    """The report as one self-contained HTML page (tables, embedded plot, where it was measured)."""
    from service.reports import html, plots

    record = _report_record(services, principal, report_id)
    result = _finished(record)
    if record.kind == BENCHMARK_KIND:
        benchmark = BenchmarkReport.from_dict(result)
        png = plots.benchmark_plot_png(benchmark) if benchmark.results else None
        return HTMLResponse(html.benchmark_html(benchmark, png))
    if record.kind == COMPARISON_KIND:
        comparison = ComparisonReport.from_dict(result)
        measured = any(row.benchmark and row.benchmark.results for row in comparison.rows)
        return HTMLResponse(
            html.comparison_html(comparison, plots.comparison_plot_png(comparison) if measured else None)
        )
    evaluation = EvaluationReport.from_dict(result)
    png = plots.evaluation_plot_png(result) if result.get("accuracy", {}).get("outputs") else None
    return HTMLResponse(html.evaluation_html(evaluation, png))


@router.get("/v1/reports/{report_id}.png", response_class=Response)
def read_report_png(report_id: str, services: ServicesDep, principal: PrincipalDep) -> Response:
    """The report's plot: latency and throughput (benchmark), engines side by side (comparison), or SNR
    per output and worst layers (evaluation). The PNG's `plot-limits` text chunk holds its axis limits."""
    from service.reports import plots

    record = _report_record(services, principal, report_id)
    result = _finished(record)
    if record.kind == BENCHMARK_KIND:
        png = plots.benchmark_plot_png(BenchmarkReport.from_dict(result))
    elif record.kind == EVALUATION_KIND:
        png = plots.evaluation_plot_png(result)
    else:
        png = plots.comparison_plot_png(ComparisonReport.from_dict(result))
    return Response(content=png, media_type="image/png")


@router.get("/v1/reports/{report_id}")
def read_report(report_id: str, services: ServicesDep, principal: PrincipalDep) -> dict[str, Any]:
    """The report JSON once finished (with `status: succeeded`); the job's status and progress before."""
    record = _report_record(services, principal, report_id)
    if record.status == "succeeded" and record.result is not None:
        return {"id": record.id, "status": record.status, **record.result}
    return job_public(record, services.engines).model_dump()


@router.delete("/v1/reports/{report_id}", response_model=JobPublic)
def cancel_report(report_id: str, services: ServicesDep, principal: PrincipalDep) -> JobDocument:
    """Cancel a queued or running report job (finished reports are left as they are)."""
    record = _report_record(services, principal, report_id)
    return job_public(cancel_owned(services, principal, record), services.engines)
