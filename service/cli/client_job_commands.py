"""Client command groups for server jobs: builds, quantizations and reports.

Contract: :func:`register_job_commands` adds the groups to the client app. Builds and
quantizations get ``list``, ``show``, ``wait`` (progress to the end; non-zero exit unless the job
succeeded) and ``cancel``; quantizations also download their calibration cache; reports are shown
(the latency table once done) and downloaded as HTML or PNG.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from service.cli.client_api import DEFAULT_URL, JobKind
from service.cli.client_options import (
    CLIENT_PANEL,
    ApiKeyOption,
    InterruptOption,
    JsonOption,
    OutputPath,
    UrlOption,
    client_session,
)

builds_app = typer.Typer(help="Follow, list and cancel build jobs.", no_args_is_help=True)
quantizations_app = typer.Typer(help="Follow, list and cancel quantization jobs.", no_args_is_help=True)
reports_app = typer.Typer(help="Read benchmark, evaluation and comparison reports.", no_args_is_help=True)


def register_job_commands(app: typer.Typer) -> None:
    """Add the job groups to ``app``."""
    for group, name in (
        (builds_app, "builds"),
        (quantizations_app, "quantizations"),
        (reports_app, "reports"),
    ):
        app.add_typer(group, name=name, rich_help_panel=CLIENT_PANEL)


# Jobs: builds and quantizations ------------------------------------------------------------------


def _job_commands(app: typer.Typer, kind: JobKind, title: str) -> None:
    """``list``, ``show``, ``wait`` and ``cancel`` for one kind of job."""

    @app.command("list")
    def list_jobs(
        limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 20,
        url: UrlOption = DEFAULT_URL,
        api_key: ApiKeyOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Recent jobs, newest first."""
        from service.cli.client_report_views import jobs_table

        with client_session(url, api_key, as_json) as (api, out):
            jobs = api.list_jobs(kind, limit=limit)
            out.result([job.document for job in jobs], jobs_table(title, jobs))

    @app.command("show")
    def show_job(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        url: UrlOption = DEFAULT_URL,
        api_key: ApiKeyOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Status, progress, phase, error, result and the last log lines."""
        from service.cli.client_report_views import job_views

        with client_session(url, api_key, as_json) as (api, out):
            state = api.job(kind, job_id)
            out.result(state.document, *job_views(state, title))

    @app.command("wait")
    def wait_job(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        on_interrupt: InterruptOption = "ask",
        url: UrlOption = DEFAULT_URL,
        api_key: ApiKeyOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Follow a job with progress until it ends; exits non-zero unless it succeeded."""
        from service.cli.client_flows import wait_for_job
        from service.cli.client_jobs import JobRef
        from service.cli.client_report_views import job_views

        with client_session(url, api_key, as_json) as (api, out):
            state = wait_for_job(api, out, JobRef(kind, job_id), on_interrupt=on_interrupt)
            out.result(state.document, *job_views(state, title))

    @app.command("cancel")
    def cancel_job(
        job_id: Annotated[str, typer.Argument(help="Job id.")],
        url: UrlOption = DEFAULT_URL,
        api_key: ApiKeyOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Cancel a queued or running job (finished jobs stay as they are)."""
        with client_session(url, api_key, as_json) as (api, out):
            state = api.cancel_job(kind, job_id)
            out.result(state.document, f"{kind} {job_id}: {state.status}")


_job_commands(builds_app, "build", "Build")
_job_commands(quantizations_app, "quantization", "Quantization")


@quantizations_app.command("calibration-cache")
def download_quantization_cache(
    job_id: Annotated[str, typer.Argument(help="Quantization job id.")],
    output: OutputPath = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download the TensorRT calibration cache of a finished quantization."""
    with client_session(url, api_key, as_json) as (api, out):
        path = f"/v1/quantizations/{job_id}/calibration-cache"
        out.downloaded(api.download(path, output, default_name=f"{job_id[:16]}.calibration.cache"))


# Reports -----------------------------------------------------------------------------------------


@reports_app.command("show")
def show_report(
    report_id: Annotated[str, typer.Argument(help="Report id (from `engine-service benchmark --no-wait`).")],
    wait: Annotated[bool, typer.Option("--wait", help="Follow the report job until it is done.")] = False,
    on_interrupt: InterruptOption = "ask",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """A report: the latency table when done, its status while it runs."""
    from service.cli.client_flows import wait_for_job
    from service.cli.client_jobs import JobRef
    from service.cli.client_report_views import report_views

    with client_session(url, api_key, as_json) as (api, out):
        ref = JobRef("report", report_id)
        state = (
            wait_for_job(api, out, ref, on_interrupt=on_interrupt) if wait else api.job("report", report_id)
        )
        if as_json:
            out.document(state.document)
        else:
            out.show(*report_views(state))


@reports_app.command("download")
def download_report(
    report_id: Annotated[str, typer.Argument(help="Report id.")],
    output: OutputPath = None,
    fmt: Annotated[
        Literal["html", "png"],
        typer.Option("--format", help="html (the full report) or png (the latency plot)."),
    ] = "html",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download a report as HTML or its plot as PNG."""
    with client_session(url, api_key, as_json) as (api, out):
        saved = api.download(f"/v1/reports/{report_id}.{fmt}", output, default_name=f"{report_id[:16]}.{fmt}")
        out.downloaded(saved)
