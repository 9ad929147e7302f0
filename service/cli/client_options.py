"""What every client command shares: the connection options, the session, and error reporting.

Contract: commands declare ``url: UrlOption = DEFAULT_URL``, ``api_key: ApiKeyOption = None`` and
``as_json: JsonOption = False`` and open :func:`client_session`, which yields an
:class:`~service.cli.client_api.ApiClient` and an :class:`~service.cli.render.Output` and turns every
:class:`~service.errors.ServiceError` (the CLI's own :class:`~service.errors.ClientError` family
included) into the message on stderr and the error's exit code. Exit codes: 0 success, 1 the server
or the input said no, 2 usage, 3 no server answered, 4 a download failed its sha256 check,
130 interrupted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from service.cli.client_jobs import InterruptPolicy

if TYPE_CHECKING:
    from service.cli.client_api import ApiClient
    from service.cli.render import Output

CLIENT_PANEL = "Client: talk to a server"
CONNECTION_PANEL = "Connection"

UrlOption = Annotated[
    str,
    typer.Option(
        "--url", envvar="ENGINE_SERVICE_URL", help="Engine service URL.", rich_help_panel=CONNECTION_PANEL
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="ENGINE_SERVICE_API_KEY",
        help="API key, sent as X-API-Key.",
        show_default=False,
        rich_help_panel=CONNECTION_PANEL,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
InterruptOption = Annotated[
    InterruptPolicy,
    typer.Option(
        "--on-interrupt",
        help="What Ctrl-C does while waiting: ask, cancel (the job) or detach (leave it running). "
        "'ask' detaches when stdin is not a terminal.",
    ),
]
OutputPath = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="File or directory to write (default: the server's file name)."),
]
WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the job until it ends.")]
Precision = Literal["int8", "fp16", "fp32", "auto"]
PRECISION_HELP = (
    "Engine precision; auto: the fastest engine that meets the accuracy target (INT8 when it keeps the "
    "target and is faster, else FP16/FP32)."
)
Backend = Literal["auto", "tensorrt", "tensorrt-rtx", "onnxruntime"]
Method = Literal["entropy", "max", "percentile", "mse", "auto"]
TaskKind = Literal["classification", "detection", "segmentation", "generic"]
MethodOption = Annotated[
    Method,
    typer.Option(
        help="Calibration method; auto (default) searches method, per-tensor thresholds and layers kept "
        "in float until the accuracy target holds."
    ),
]
TaskOption = Annotated[
    TaskKind | None,
    typer.Option("--task", help="The task whose metric judges INT8 (default: the model's, else guessed)."),
]
AccuracyTargetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--accuracy-target",
        help="METRIC=MIN the INT8 result must meet on held-out samples, e.g. top1_agreement=0.99 or "
        "detection_recall=0.95 (repeatable; default: the task's).",
    ),
]


def accuracy_fields(task: str | None, targets: list[str] | None) -> dict[str, object]:
    """The ``task`` / ``accuracy_target`` request fields from the command line's options."""
    from service.errors import BadInput

    fields: dict[str, object] = {}
    if task is not None:
        fields["task"] = {"kind": task}
    parsed = []
    for item in targets or ():
        metric, sep, value = item.partition("=")
        try:
            parsed.append({"metric": metric.strip(), "min": float(value)})
        except ValueError:
            sep = ""
        if not sep or not metric.strip():
            raise BadInput(f"--accuracy-target '{item}': write METRIC=MIN, e.g. top1_agreement=0.99.")
    if parsed:
        fields["accuracy_target"] = parsed
    return fields


@contextmanager
def reported_errors(out: Output) -> Iterator[None]:
    """Print ServiceError messages (the CLI's own client errors included) on stderr and exit with their
    ``exit_code``."""
    from service.errors import ServiceError

    try:
        yield
    except ServiceError as exc:
        out.error(exc.message)
        raise typer.Exit(exc.exit_code) from exc


@contextmanager
def client_session(url: str, api_key: str | None, as_json: bool) -> Iterator[tuple[ApiClient, Output]]:
    """A client for ``url`` and an output for one command, with errors reported (see the module docstring)."""
    from service.cli.client_api import ApiClient
    from service.cli.render import Output

    out = Output(as_json=as_json)
    with reported_errors(out), ApiClient.connect(url, api_key) as api:
        yield api, out
