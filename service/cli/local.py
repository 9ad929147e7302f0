"""`engine-service local ...`: the whole pipeline in one process, without a server.

Contract: ``local build`` starts the real app (:func:`service.app.create_app`, lifespan and job
runner included) in this process behind an httpx ASGI transport (:mod:`service.cli.client_asgi`)
and drives it with the very same :class:`~service.cli.client_api.ApiClient` calls as the client
commands: upload the model, upload the calibration (and evaluation) files checked against it,
request the build and follow it, download the engine with its sha256 checked, and gather the
engine, fusion and layer documents into a JSON report. There is one pipeline, reached over two transports.

Everything the service stores (models, calibration sets, the engine cache, its SQLite database) lives
under the data directory: ``--data-dir``, else ``$ENGINE_SERVICE_LOCAL_DIR``, else
``$XDG_CACHE_HOME/engine-service`` (``~/.cache/engine-service``), so a repeated build is a cache hit.
Authentication is off (nothing listens on a port) and logging is quiet. Ctrl-C cancels the build,
since the process that runs it is about to end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli.client_options import (
    PRECISION_HELP,
    AccuracyTargetOption,
    Backend,
    JsonOption,
    MethodOption,
    Precision,
    TaskOption,
    accuracy_fields,
    reported_errors,
)
from service.datasets.preprocess_examples import cli_help

if TYPE_CHECKING:
    from service.cli.client_api import ApiClient, Document
    from service.cli.render import Output
    from service.config import Settings

LOCAL_PANEL = "Local: no server needed"
LOCAL_BASE_URL = "http://engine-service.local"
local_app = typer.Typer(help="Run the pipeline in this process, without a server.", no_args_is_help=True)


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/engine-service``, or ``~/.cache/engine-service``."""
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache) if cache else Path.home() / ".cache") / "engine-service"


def local_settings(data_dir: Path) -> Settings:
    """Service settings with every data root under ``data_dir``; other options still come from the env."""
    from service.config import Settings

    root = data_dir.expanduser().resolve()
    values: dict[str, Any] = {
        "engines_dir": root / "engines",
        "calibration_dir": root / "calibration_data",
        "models_dir": root / "models",
        "database_path": root / "engine_service.db",
        "auth_enabled": False,  # in-process: no port is opened, so there is nobody to authenticate
        "queue_backend": "embedded",  # the build must run in this process, not on a remote worker
        "log_level": "WARNING",
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def in_process_client(settings: Settings) -> Iterator[ApiClient]:
    """An ApiClient over the real app running in this process (lifespan started and stopped)."""
    from service.app import create_app
    from service.cli.client_api import ApiClient
    from service.cli.client_asgi import in_process_http

    with in_process_http(create_app(settings), base_url=LOCAL_BASE_URL) as http:
        yield ApiClient(http, label="the in-process service")


@dataclass(frozen=True)
class LocalBuildResult:
    """Where a local build put things."""

    engine_id: str
    engine_path: Path
    engine_sha256: str
    engine_bytes: int
    report_path: Path
    data_dir: Path
    cache: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "engine_path": str(self.engine_path),
            "engine_sha256": self.engine_sha256,
            "engine_bytes": self.engine_bytes,
            "report_path": str(self.report_path),
            "data_dir": str(self.data_dir),
            "cache": self.cache,
        }


def default_report_path(engine_path: Path) -> Path:
    return engine_path.with_name(f"{engine_path.stem}.report.json")


@local_app.command("build", rich_help_panel=LOCAL_PANEL)
def local_build(
    model: Annotated[
        Path, typer.Argument(help="The .onnx model.", exists=True, dir_okay=False, readable=True)
    ],
    precision: Annotated[Precision, typer.Option(help=PRECISION_HELP)] = "int8",
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="Calibration file: .npz, .npy or an image .zip/.tar.", exists=True),
    ] = None,
    preprocess: Annotated[
        str | None,
        typer.Option(help=cli_help("the image archives of --calib and --eval (.npz / .npy files take none)")),
    ] = None,
    calib_preprocess: Annotated[
        str | None, typer.Option(help="PreprocessSpec for --calib alone (replaces --preprocess for it).")
    ] = None,
    eval_preprocess: Annotated[
        str | None, typer.Option(help="PreprocessSpec for --eval alone (replaces --preprocess for it).")
    ] = None,
    eval_file: Annotated[
        Path | None,
        typer.Option("--eval", help="Held-out file for the accuracy check (same formats).", exists=True),
    ] = None,
    backend: Annotated[Backend, typer.Option(help="Backend; auto picks the best one available.")] = "auto",
    method: MethodOption = "auto",
    task: TaskOption = None,
    accuracy_target: AccuracyTargetOption = None,
    percentile: Annotated[float, typer.Option(help="Percentile for method 'percentile'.")] = 99.99,
    max_samples: Annotated[int | None, typer.Option(help="Calibrate on at most this many samples.")] = None,
    holdout_fraction: Annotated[float, typer.Option(help="Share of samples held out for accuracy.")] = 0.2,
    keep: Annotated[
        list[str] | None, typer.Option(help="Keep out of INT8: node, op type, first, last.")
    ] = None,
    shape: Annotated[
        list[str] | None, typer.Option(help="Shape range NAME=MIN:OPT:MAX (dims joined by x).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Engine file or directory (default: here).")
    ] = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Report JSON (default: beside the engine, .report.json).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="ENGINE_SERVICE_LOCAL_DIR",
            help="Service data and engine cache (default ~/.cache).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Build an engine from local files in this process: same pipeline as the server, no server."""
    from service.cli.client_flows import parse_shape_ranges
    from service.cli.client_inputs import preprocess_text
    from service.cli.render import Output

    out = Output(as_json=as_json)
    root = (data_dir or default_data_dir()).expanduser().resolve()
    with reported_errors(out):
        shared = preprocess_text(preprocess)
        specs = {
            "calibration": set_preprocess(calib, preprocess_text(calib_preprocess), shared),
            "evaluation": set_preprocess(eval_file, preprocess_text(eval_preprocess), shared),
        }
        shapes = parse_shape_ranges(shape or ())
        calibration = {
            "method": method,
            "percentile": percentile,
            "max_samples": max_samples,
            "holdout_fraction": holdout_fraction,
        }
        with in_process_client(local_settings(root)) as api:
            result = _run_local_build(
                api,
                out,
                model=model,
                calib=calib,
                eval_file=eval_file,
                preprocess=specs,
                build={
                    "precision": precision,
                    "backend": backend,
                    "calibration": calibration,
                    "keep": list(keep or ()),
                    "shapes": shapes,
                    **accuracy_fields(task, accuracy_target),
                },
                output=output,
                report=report,
                data_dir=root,
            )
    if as_json:
        out.document(result.to_dict())
        return
    out.line(f"engine     {result.engine_path} ({result.engine_bytes} bytes, sha256 {result.engine_sha256})")
    out.line(f"report     {result.report_path}")
    out.line(f"engine id  {result.engine_id} (cache {result.cache})")
    out.line(f"data dir   {result.data_dir} (models, calibration sets and engine cache; reused next time)")


def _run_local_build(
    api: ApiClient,
    out: Output,
    *,
    model: Path,
    calib: Path | None,
    eval_file: Path | None,
    preprocess: dict[str, str | None],
    build: dict[str, Any],
    output: Path | None,
    report: Path | None,
    data_dir: Path,
) -> LocalBuildResult:
    from service.cli.client_flows import build_engine, download_plan, write_json

    model_doc = api.upload_model(model).document
    model_id = str(model_doc["id"])
    out.note(f"model {model_id} from {model}")
    calib_doc = _upload_set(api, out, calib, preprocess["calibration"], model_id, "calibration")
    eval_doc = _upload_set(api, out, eval_file, preprocess["evaluation"], model_id, "evaluation")
    body = {
        "model_id": model_id,
        "calibration_set_id": calib_doc["id"] if calib_doc else None,
        "eval_set_id": eval_doc["id"] if eval_doc else None,
        **build,
    }
    outcome = build_engine(api, out, body, on_interrupt="cancel")
    engine_id = outcome.engine_id
    downloaded = download_plan(api, engine_id, output)
    document = {
        "engine": outcome.engine,
        "engine_file": {
            "path": str(downloaded.path),
            "sha256": downloaded.sha256,
            "bytes": downloaded.size_bytes,
        },
        "model": model_doc,
        "calibration_set": calib_doc,
        "eval_set": eval_doc,
        "build": outcome.to_dict() | {"engine": None},  # the engine document is already above
        "fusions": api.engine_fusions(engine_id),
        "layers": api.engine_layers(engine_id),
        "data_dir": str(data_dir),
    }
    report_path = write_json(report or default_report_path(downloaded.path), document)
    return LocalBuildResult(
        engine_id=engine_id,
        engine_path=downloaded.path,
        engine_sha256=downloaded.sha256,
        engine_bytes=downloaded.size_bytes,
        report_path=report_path,
        data_dir=data_dir,
        cache=outcome.ticket.cache,
    )


ARRAY_SUFFIXES = (".npz", ".npy")


def set_preprocess(file: Path | None, own: str | None, shared: str | None) -> str | None:
    """The spec one set is uploaded with: its own option, else the shared ``--preprocess``.

    The shared spec describes images, so it is not sent with an array file (``.npz`` / ``.npy``): an
    image calibration archive and an ``.npz`` held-out set work together with one ``--preprocess``.
    An explicit per-set spec is always sent (the server says so if it does not fit the file).
    """
    if file is None:
        return None
    if own is not None:
        return own
    return None if file.name.lower().endswith(ARRAY_SUFFIXES) else shared


def _upload_set(
    api: ApiClient, out: Output, file: Path | None, preprocess: str | None, model_id: str, role: str
) -> Document | None:
    if file is None:
        return None
    document = api.upload_calibration_set(file, preprocess=preprocess, model_id=model_id).document
    out.note(f"{role} set {document['id']} from {file} ({document.get('samples', '?')} samples)")
    return document
