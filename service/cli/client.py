"""The client commands of `engine-service`: talk to a running server over its HTTP API.

Contract: :data:`client_app` holds the commands and is merged into the top-level CLI, so they read
``engine-service build MODEL ...``, ``engine-service models upload model.onnx`` and so on. Every
command takes ``--url`` (env ``ENGINE_SERVICE_URL``, default ``http://127.0.0.1:8000``),
``--api-key`` (env ``ENGINE_SERVICE_API_KEY``) and ``--json`` (one JSON document on stdout instead of
tables). Exit codes: 0 success, 1 the server or the input said no (its message is printed), 2 usage,
3 no server answered, 4 a download failed its sha256 check, 130 interrupted.

Imports stay light at module level: the CLI starts for ``--help`` without httpx, numpy or rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from service.cli.client_api import DEFAULT_URL
from service.cli.client_job_commands import register_job_commands
from service.cli.client_options import (
    CLIENT_PANEL,
    PRECISION_HELP,
    AccuracyTargetOption,
    ApiKeyOption,
    Backend,
    InterruptOption,
    JsonOption,
    MethodOption,
    Precision,
    TaskOption,
    UrlOption,
    WaitOption,
    accuracy_fields,
    client_session,
)
from service.cli.client_report_commands import register_report_commands
from service.cli.client_resources import register_resource_commands
from service.cli.local import LOCAL_PANEL, local_app
from service.datasets.preprocess_examples import cli_help

client_app = typer.Typer(no_args_is_help=True)


@client_app.command("build", rich_help_panel=CLIENT_PANEL)
def build_command(
    model_id: Annotated[str, typer.Argument(help="Model id (from `engine-service models upload`).")],
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = "int8",
    calib: Annotated[
        str | None, typer.Option("--calib", help="Calibration set id (INT8 on FP32 models).")
    ] = None,
    eval_set: Annotated[
        str | None, typer.Option("--eval", help="Held-out set id for the accuracy check.")
    ] = None,
    backend: Annotated[Backend, typer.Option(help="Backend; auto picks the best one available.")] = "auto",
    device: Annotated[
        str | None,
        typer.Option(
            help="Which build target when workers for several devices are live: part of the device name "
            "or the compute capability (see GET /v1/build-targets)."
        ),
    ] = None,
    method: MethodOption = "auto",
    task: TaskOption = None,
    accuracy_target: AccuracyTargetOption = None,
    percentile: Annotated[float, typer.Option(help="Percentile for method 'percentile'.")] = 99.99,
    max_samples: Annotated[int | None, typer.Option(help="Calibrate on at most this many samples.")] = None,
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of samples held out for the accuracy check.")
    ] = 0.2,
    keep: Annotated[
        list[str] | None,
        typer.Option(help="Keep out of INT8: node name, op type, 'first' or 'last' (repeatable)."),
    ] = None,
    shape: Annotated[
        list[str] | None,
        typer.Option(help="Dynamic shape range NAME=MIN:OPT:MAX, dims joined by x (repeatable)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Download the engine here when done.")
    ] = None,
    wait: WaitOption = True,
    on_interrupt: InterruptOption = "ask",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build an engine (cache hit or build job), with progress until it is ready."""
    from service.cli.client_flows import build_engine, download_plan, parse_shape_ranges
    from service.cli.client_views import engine_views

    with client_session(url, api_key, as_json) as (api, out):
        body = {
            "model_id": model_id,
            "precision": precision,
            "backend": backend,
            "calibration_set_id": calib,
            "eval_set_id": eval_set,
            "calibration": {
                "method": method,
                "percentile": percentile,
                "max_samples": max_samples,
                "holdout_fraction": holdout_fraction,
            },
            "keep": list(keep or ()),
            "shapes": parse_shape_ranges(shape or ()),
            **accuracy_fields(task, accuracy_target),
        }
        if device is not None:
            body["device"] = device
        outcome = build_engine(api, out, body, wait=wait, on_interrupt=on_interrupt)
        document = outcome.to_dict()
        if output is not None and outcome.engine is not None:
            downloaded = download_plan(api, outcome.engine_id, output)
            document["download"] = {
                "path": str(downloaded.path),
                "sha256": downloaded.sha256,
                "size_bytes": downloaded.size_bytes,
            }
            out.note(f"wrote {downloaded.path} ({downloaded.size_bytes} bytes, sha256 verified)")
        elif output is not None:
            out.note(
                f"not writing {output}: the build is still running (download it with `engines download`)"
            )
        if as_json:
            out.document(document)
        elif outcome.engine is not None:
            out.show(*engine_views(outcome.engine))
        else:
            out.line(
                f"build {outcome.ticket.job_id} is {outcome.job.status if outcome.job else 'queued'}; "
                f"follow it with `engine-service builds wait {outcome.ticket.job_id}`"
            )


@client_app.command("infer", rich_help_panel=CLIENT_PANEL)
def infer_command(
    engine_id: Annotated[str, typer.Argument(help="Engine id.")],
    inputs: Annotated[
        list[str],
        typer.Option(
            "--input",
            "-i",
            help="[NAME=]FILE: .npy, .npz, .png or .jpg (repeatable; images for one input form a batch).",
        ),
    ],
    preprocess: Annotated[
        str | None,
        typer.Option(help=cli_help("image inputs (default: derived from the input's static shape)")),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the outputs to this .npz.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run an engine on the server with inputs from files."""
    from service.cli.client_flows import engine_input_specs, write_npz
    from service.cli.client_inputs import InputFile, InputSpec, load_inputs, parse_preprocess
    from service.cli.client_report_views import outputs_table

    with client_session(url, api_key, as_json) as (api, out):
        spec = parse_preprocess(preprocess)
        files = [InputFile.parse(text) for text in inputs]
        engine = api.engine(engine_id)
        specs = [InputSpec.from_document(item) for item in engine_input_specs(api, engine)]
        arrays = load_inputs(files, specs, spec)
        results = api.infer(engine_id, arrays)
        if output is not None:
            write_npz(output, results)
            out.note(f"wrote {output} ({', '.join(results)})")
        if as_json:
            described: dict[str, Any] = {}
            for name, array in results.items():
                described[name] = {"dtype": array.dtype.name, "shape": list(array.shape)}
                if output is None:
                    described[name]["values"] = array.tolist()
            out.document(
                {"engine_id": engine_id, "outputs": described, "written_to": str(output) if output else None}
            )
        else:
            out.show(outputs_table(results))


@client_app.command("quantize", rich_help_panel=CLIENT_PANEL)
def quantize_command(
    model_id: Annotated[str, typer.Argument(help="FP32 model id.")],
    calib: Annotated[str, typer.Option("--calib", help="Calibration set id.")],
    eval_set: Annotated[str | None, typer.Option("--eval", help="Held-out set id.")] = None,
    method: MethodOption = "auto",
    task: TaskOption = None,
    accuracy_target: AccuracyTargetOption = None,
    percentile: Annotated[float, typer.Option(help="Percentile for method 'percentile'.")] = 99.99,
    keep: Annotated[
        list[str] | None,
        typer.Option(help="Keep out of INT8: node name, op type, 'first' or 'last' (repeatable)."),
    ] = None,
    skip: Annotated[
        list[str] | None, typer.Option("--skip", hidden=True, help="Deprecated name of --keep.")
    ] = None,
    target: Annotated[
        Literal["tensorrt", "onnxruntime"],
        typer.Option(
            help="Whose Q/DQ placement: tensorrt (TensorRT, TensorRT-RTX) or onnxruntime (ONNX Runtime's "
            "CPU integer kernels; that model is for ONNX Runtime only)."
        ),
    ] = "tensorrt",
    sensitivity: Annotated[
        Literal["off", "rank", "auto"],
        typer.Option(help="rank: per-layer SNR ranking; auto: also keep sensitive layers out of INT8."),
    ] = "off",
    min_snr_db: Annotated[float | None, typer.Option(help="Accuracy bound for --sensitivity auto.")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Accuracy bound for --sensitivity auto.")] = None,
    holdout_fraction: Annotated[
        float, typer.Option(help="Share of samples held out for accuracy checks.")
    ] = 0.2,
    max_samples: Annotated[int | None, typer.Option(help="Calibrate on at most this many samples.")] = None,
    wait: WaitOption = True,
    on_interrupt: InterruptOption = "ask",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Calibrate an FP32 model into a Q/DQ model (accuracy and sensitivity included)."""
    from service.cli.client_flows import wait_for_job
    from service.cli.client_jobs import JobRef
    from service.cli.client_report_views import quantization_views

    with client_session(url, api_key, as_json) as (api, out):
        if skip:
            out.warning("--skip is deprecated: it is called --keep, as on `engine-service build`")
        body = {
            "model_id": model_id,
            "calibration_set_id": calib,
            "eval_set_id": eval_set,
            "method": method,
            "percentile": percentile,
            # The quantization API still names this field "skip"; builds call it "keep".
            "skip": [*(keep or ()), *(skip or ())],
            "target": target,
            "sensitivity": sensitivity,
            "min_snr_db": min_snr_db,
            "min_cosine": min_cosine,
            "holdout_fraction": holdout_fraction,
            "max_samples": max_samples,
            **accuracy_fields(task, accuracy_target),
        }
        started = api.create_quantization(body)
        out.note(f"quantization {started.id} queued")
        state = (
            wait_for_job(api, out, JobRef("quantization", started.id), on_interrupt=on_interrupt)
            if wait
            else started
        )
        if as_json:
            out.document(state.document)
        elif wait:
            out.show(*quantization_views(state))
        else:
            out.line(
                f"quantization {state.id}: follow it with `engine-service quantizations wait {state.id}`"
            )


@client_app.command("fusions", rich_help_panel=CLIENT_PANEL)
def fusions_command(
    model_id: Annotated[str | None, typer.Argument(help="Model id: the static analysis.")] = None,
    engine_id: Annotated[
        str | None, typer.Option("--engine", help="Engine id: what the build really fused.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fusion patterns (Conv-BN-ReLU, Conv-BN-Add, ...) of a model, or as verified in an engine."""
    from service.cli.client_views import engine_fusions_table, static_fusions_table
    from service.errors import BadInput

    with client_session(url, api_key, as_json) as (api, out):
        if (model_id is None) == (engine_id is None):
            raise BadInput("Give a MODEL id or --engine ID (one of the two).")
        report = api.engine_fusions(engine_id) if engine_id else api.model_fusions(str(model_id))
        if as_json:
            out.document(report)
        else:
            out.show(*(engine_fusions_table(report) if engine_id else static_fusions_table(report)))


register_report_commands(client_app)
register_resource_commands(client_app)
register_job_commands(client_app)
client_app.add_typer(local_app, name="local", rich_help_panel=LOCAL_PANEL)
