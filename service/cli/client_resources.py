"""Client command groups for the server's resources: models, calib, builds, quantizations, engines, reports.

Contract: :func:`register_resource_commands` adds the groups to the client app. Each group has
``list`` and ``show`` (tables, or the server's JSON with ``--json``); uploads print the new id (and
say when the same bytes were uploaded before); downloads stream to disk and keep the file only when
it matches the server's sha256; job groups add ``wait`` (progress to the end) and ``cancel``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from service.cli.client_api import DEFAULT_URL
from service.cli.client_options import (
    CLIENT_PANEL,
    ApiKeyOption,
    JsonOption,
    OutputPath,
    UrlOption,
    client_session,
)
from service.datasets.preprocess_examples import cli_help

models_app = typer.Typer(help="Upload, list, show, download and delete ONNX models.", no_args_is_help=True)
calib_app = typer.Typer(help="Upload, list, show and delete calibration sets.", no_args_is_help=True)
engines_app = typer.Typer(help="List, show, download and delete built engines.", no_args_is_help=True)


def register_resource_commands(app: typer.Typer) -> None:
    """Add the resource groups to ``app``."""
    for group, name in (
        (models_app, "models"),
        (calib_app, "calib"),
        (engines_app, "engines"),
    ):
        app.add_typer(group, name=name, rich_help_panel=CLIENT_PANEL)


# Models ------------------------------------------------------------------------------------------


@models_app.command("upload")
def upload_model(
    file: Annotated[Path, typer.Argument(help="The .onnx file.", exists=True, dir_okay=False, readable=True)],
    name: Annotated[str | None, typer.Option(help="Name to show (default: the file name).")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a model; prints its id (the sha256 of its bytes)."""
    from service.cli.client_views import model_views

    with client_session(url, api_key, as_json) as (api, out):
        upload = api.upload_model(file, name=name)
        if as_json:
            out.document({**upload.document, "created": upload.created})
            return
        out.note(
            f"uploaded {file} as model {upload.document['id']}"
            + ("" if upload.created else " (already there)")
        )
        out.show(*model_views(upload.document))


@models_app.command("list")
def list_models(
    source: Annotated[
        str | None, typer.Option(help="Only this source: upload, quantization or build.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """List models, newest first."""
    from service.cli.client_views import models_table

    with client_session(url, api_key, as_json) as (api, out):
        models = api.list_models(source=source)
        out.result(models, models_table(models))


@models_app.command("show")
def show_model(
    model_id: Annotated[str, typer.Argument(help="Model id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """One model: I/O, opset, operators, explicit quantization."""
    from service.cli.client_views import model_views

    with client_session(url, api_key, as_json) as (api, out):
        model = api.model(model_id)
        out.result(model, *model_views(model))


@models_app.command("download")
def download_model(
    model_id: Annotated[str, typer.Argument(help="Model id.")],
    output: OutputPath = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download a model's exact bytes (verified against its sha256)."""
    with client_session(url, api_key, as_json) as (api, out):
        saved = api.download(f"/v1/models/{model_id}/onnx", output, default_name=f"{model_id[:16]}.onnx")
        out.downloaded(saved)


@models_app.command("delete")
def delete_model(
    model_id: Annotated[str, typer.Argument(help="Model id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a model that no engine or active job uses."""
    with client_session(url, api_key, as_json) as (api, out):
        api.delete_model(model_id)
        out.result({"deleted": model_id}, f"deleted model {model_id}")


# Calibration sets --------------------------------------------------------------------------------


@calib_app.command("upload")
def upload_calibration_set(
    file: Annotated[
        Path, typer.Argument(help=".npz, .npy, or a .zip/.tar of images.", exists=True, dir_okay=False)
    ],
    preprocess: Annotated[
        str | None, typer.Option(help=cli_help("image archives (required for them)"))
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model", help="Check the set against this model now.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Name to show (default: the file name).")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a calibration set; prints its id, sample count and per-input shapes."""
    from service.cli.client_inputs import preprocess_text
    from service.cli.client_views import calibration_set_views

    with client_session(url, api_key, as_json) as (api, out):
        upload = api.upload_calibration_set(
            file, name=name, preprocess=preprocess_text(preprocess), model_id=model_id
        )
        if as_json:
            out.document({**upload.document, "created": upload.created})
            return
        again = "" if upload.created else " (already there)"
        out.note(f"uploaded {file} as calibration set {upload.document['id']}{again}")
        out.show(*calibration_set_views(upload.document))


@calib_app.command("list")
def list_calibration_sets(
    url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None, as_json: JsonOption = False
) -> None:
    """List calibration sets, newest first."""
    from service.cli.client_views import calibration_sets_table

    with client_session(url, api_key, as_json) as (api, out):
        sets = api.list_calibration_sets()
        out.result(sets, calibration_sets_table(sets))


@calib_app.command("show")
def show_calibration_set(
    set_id: Annotated[str, typer.Argument(help="Calibration set id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """One calibration set: format, samples, per-input shape, dtype and value range."""
    from service.cli.client_views import calibration_set_views

    with client_session(url, api_key, as_json) as (api, out):
        item = api.calibration_set(set_id)
        out.result(item, *calibration_set_views(item))


@calib_app.command("delete")
def delete_calibration_set(
    set_id: Annotated[str, typer.Argument(help="Calibration set id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete a calibration set that no active job uses."""
    with client_session(url, api_key, as_json) as (api, out):
        api.delete_calibration_set(set_id)
        out.result({"deleted": set_id}, f"deleted calibration set {set_id}")


# Engines -----------------------------------------------------------------------------------------

ARTIFACTS = {"plan": "plan", "calibration-cache": "calibration-cache", "onnx": "model.onnx"}


@engines_app.command("list")
def list_engines(
    model_id: Annotated[str | None, typer.Option("--model", help="Only engines of this model.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cached engines, newest first."""
    from service.cli.client_views import engines_table

    with client_session(url, api_key, as_json) as (api, out):
        engines = api.list_engines(model_id=model_id)
        out.result(engines, engines_table(engines))


@engines_app.command("show")
def show_engine(
    engine_id: Annotated[str, typer.Argument(help="Engine id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Backend, device, precision, size, layer counts, fusion and accuracy summaries."""
    from service.cli.client_views import engine_views

    with client_session(url, api_key, as_json) as (api, out):
        engine = api.engine(engine_id)
        out.result(engine, *engine_views(engine))


@engines_app.command("layers")
def show_engine_layers(
    engine_id: Annotated[str, typer.Argument(help="Engine id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every engine layer: type, precision, tensor types and the ONNX nodes fused into it."""
    from service.cli.client_views import layers_table

    with client_session(url, api_key, as_json) as (api, out):
        report = api.engine_layers(engine_id)
        out.result(report, layers_table(report))


@engines_app.command("download")
def download_engine(
    engine_id: Annotated[str, typer.Argument(help="Engine id.")],
    output: OutputPath = None,
    artifact: Annotated[
        Literal["plan", "calibration-cache", "onnx"],
        typer.Option(help="plan (the engine), calibration-cache, or onnx (the exact ONNX built)."),
    ] = "plan",
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Download an engine plan (or its calibration cache / built ONNX), verified against X-Content-SHA256."""
    if artifact not in ARTIFACTS:
        raise typer.BadParameter(
            f"'{artifact}' is not one of {', '.join(ARTIFACTS)}.", param_hint="--artifact"
        )
    suffix = {"plan": ".plan", "calibration-cache": ".calibration.cache", "onnx": "-built.onnx"}[artifact]
    with client_session(url, api_key, as_json) as (api, out):
        path = f"/v1/engines/{engine_id}/{ARTIFACTS[artifact]}"
        out.downloaded(api.download(path, output, default_name=f"{engine_id[:16]}{suffix}"))


@engines_app.command("delete")
def delete_engine(
    engine_id: Annotated[str, typer.Argument(help="Engine id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Remove an engine from the cache."""
    with client_session(url, api_key, as_json) as (api, out):
        api.delete_engine(engine_id)
        out.result({"deleted": engine_id}, f"deleted engine {engine_id}")
