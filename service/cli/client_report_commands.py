"""Client commands that measure engines on the server: ``benchmark``, ``evaluate`` and ``compare``.

Contract: :func:`register_report_commands` adds them to the client app. Each starts a report job
(``POST /v1/engines/{id}/benchmark``, ``POST /v1/engines/{id}/evaluate``, ``POST /v1/reports/comparison``),
follows it to the end unless ``--no-wait`` and prints the report's table (or one JSON document with
``--json``); the report stays readable with ``engine-service reports show ID`` and downloadable with
``engine-service reports download ID``. Exit code 1 when the report job did not succeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli.client_api import DEFAULT_URL
from service.cli.client_options import (
    CLIENT_PANEL,
    ApiKeyOption,
    InterruptOption,
    JsonOption,
    UrlOption,
    WaitOption,
    client_session,
)

if TYPE_CHECKING:
    from rich.table import Table

    from service.cli.client_api import ApiClient, JobState
    from service.cli.client_jobs import InterruptPolicy
    from service.cli.render import Output

BatchSizesOption = Annotated[str, typer.Option(help="Comma-separated batch sizes, e.g. 1,8.")]
IterationsOption = Annotated[
    int | None, typer.Option(help="Timed calls per batch size (default 100 unless --duration).")
]
DurationOption = Annotated[
    float | None, typer.Option("--duration", help="Seconds per batch size instead of --iterations.")
]
WarmupOption = Annotated[int, typer.Option(help="Untimed calls first.")]
ConcurrencyOption = Annotated[int, typer.Option(help="Parallel callers.")]
ShapeOption = Annotated[
    list[str] | None,
    typer.Option(
        "--shape",
        help="Input shape NAME=DIMS with dims joined by x, e.g. images=1x3x640x640 (repeatable), for "
        "engines with dynamic height/width; the batch dim is replaced by each batch size. Default: the "
        "engine's build shape range, else its calibration set's shape.",
    ),
]


def parse_shapes(values: list[str] | None) -> dict[str, list[int]]:
    """``NAME=1x3x640x640`` options as the API's ``shapes``."""
    from service.errors import BadInput

    shapes: dict[str, list[int]] = {}
    for value in values or ():
        name, _, dims = value.partition("=")
        try:
            shapes[name.strip()] = [int(d) for d in dims.lower().split("x")]
        except ValueError as exc:
            raise BadInput(
                f"--shape '{value}': write NAME=DIMS with dims joined by x (images=1x3x640x640)."
            ) from exc
        if not name.strip() or not dims:
            raise BadInput(f"--shape '{value}': write NAME=DIMS with dims joined by x (images=1x3x640x640).")
    return shapes


def benchmark_config(
    batch_sizes: str,
    iterations: int | None,
    duration: float | None,
    warmup: int,
    concurrency: int,
    shapes: list[str] | None = None,
) -> dict[str, Any]:
    """The benchmark options as the API takes them (``BenchmarkOptions``), checked like the server does."""
    from service.errors import BadInput

    try:
        sizes = [int(part) for part in batch_sizes.split(",") if part.strip()]
    except ValueError as exc:
        raise BadInput(f"--batch-sizes '{batch_sizes}': give whole numbers separated by commas.") from exc
    if iterations is not None and duration is not None:
        raise BadInput("Give --iterations or --duration, not both.")
    return {
        "batch_sizes": sizes,
        "warmup": warmup,
        "concurrency": concurrency,
        "iterations": None if duration is not None else (iterations or 100),
        "duration_s": duration,
        "shapes": parse_shapes(shapes),
    }


def _follow(
    api: ApiClient,
    out: Output,
    started: JobState,
    label: str,
    *,
    wait: bool,
    on_interrupt: InterruptPolicy,
) -> JobState | None:
    """Announce the report job; follow it when asked. None when not waiting (a hint was printed)."""
    from service.cli.client_flows import wait_for_job
    from service.cli.client_jobs import JobRef

    out.note(f"{label} report {started.id} started")
    if not wait:
        hint = f"report {started.id}: follow it with `engine-service reports show {started.id} --wait`"
        out.result(started.document, hint)
        return None
    return wait_for_job(api, out, JobRef("report", started.id), on_interrupt=on_interrupt)


def _show(out: Output, state: JobState, views: list[Table]) -> None:
    out.result({"report_id": state.id, **(state.result or {})}, *views)


def benchmark_command(
    engine_id: Annotated[str, typer.Argument(help="Engine id.")],
    batch_sizes: BatchSizesOption = "1",
    iterations: IterationsOption = None,
    duration: DurationOption = None,
    warmup: WarmupOption = 10,
    concurrency: ConcurrencyOption = 1,
    shape: ShapeOption = None,
    wait: WaitOption = True,
    on_interrupt: InterruptOption = "ask",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Measure latency percentiles and throughput on the server; prints where it was measured."""
    from service.cli.client_report_views import benchmark_table

    with client_session(url, api_key, as_json) as (api, out):
        config = benchmark_config(batch_sizes, iterations, duration, warmup, concurrency, shape)
        started = api.start_benchmark(engine_id, config)
        state = _follow(api, out, started, "benchmark", wait=wait, on_interrupt=on_interrupt)
        if state is not None:
            _show(out, state, benchmark_table(state.result or {}))


def evaluate_command(
    engine_id: Annotated[str, typer.Argument(help="Engine id.")],
    eval_set: Annotated[str, typer.Option("--eval", help="Stored set id to compare the outputs on.")],
    max_samples: Annotated[int | None, typer.Option(help="Use at most this many samples.")] = None,
    wait: WaitOption = True,
    on_interrupt: InterruptOption = "ask",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Compare an engine's outputs with its FP32 reference on a stored set (accuracy, layer deltas)."""
    from service.cli.client_report_views import evaluation_views

    with client_session(url, api_key, as_json) as (api, out):
        started = api.start_evaluation(engine_id, eval_set, max_samples)
        state = _follow(api, out, started, "evaluation", wait=wait, on_interrupt=on_interrupt)
        if state is not None:
            _show(out, state, evaluation_views(state.result or {}))


def compare_command(
    engine_ids: Annotated[list[str], typer.Argument(help="Two or more engine ids of one model.")],
    eval_set: Annotated[
        str | None, typer.Option("--eval", help="Also evaluate each engine on this stored set.")
    ] = None,
    batch_sizes: BatchSizesOption = "1",
    iterations: IterationsOption = None,
    duration: DurationOption = None,
    warmup: WarmupOption = 10,
    concurrency: ConcurrencyOption = 1,
    shape: ShapeOption = None,
    wait: WaitOption = True,
    on_interrupt: InterruptOption = "ask",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Benchmark engines of one model side by side (FP32, FP16, INT8): latency, speedup, accuracy."""
    from service.cli.client_report_views import comparison_table

    with client_session(url, api_key, as_json) as (api, out):
        config = benchmark_config(batch_sizes, iterations, duration, warmup, concurrency, shape)
        started = api.start_comparison(engine_ids, config, eval_set)
        state = _follow(api, out, started, "comparison", wait=wait, on_interrupt=on_interrupt)
        if state is not None:
            _show(out, state, comparison_table(state.result or {}))


def register_report_commands(app: typer.Typer) -> None:
    """Add ``benchmark``, ``evaluate`` and ``compare`` to ``app``."""
    for name, command in (
        ("benchmark", benchmark_command),
        ("evaluate", evaluate_command),
        ("compare", compare_command),
    ):
        app.command(name, rich_help_panel=CLIENT_PANEL)(command)
