"""Multi-call workflows shared by the client commands and the local mode: one pipeline, two transports.

Contract: every function takes an :class:`~service.cli.client_api.ApiClient` (remote, or the
in-process app of the local mode) and an :class:`~service.cli.render.Output`, makes the same HTTP
calls either way, renders progress while it waits, and returns frozen values. Failures surface as
:class:`~service.errors.ClientError` (server, transport, job) or
:class:`~service.errors.ServiceError` (local input), which the command layer prints.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.client_api import ApiClient, BuildTicket, Document, DownloadedFile, JobState
from service.cli.client_jobs import InterruptPolicy, JobRef, follow_job, require_success
from service.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

    from service.cli.render import Output


@dataclass(frozen=True)
class BuildOutcome:
    """A build request's ticket, the finished job on a cache miss, and the engine once it exists."""

    ticket: BuildTicket
    job: JobState | None
    engine: Document | None

    @property
    def engine_id(self) -> str:
        """The engine delivered: the ticket's, or the one a precision "auto" job chose."""
        found = (self.engine or {}).get("id") or self.ticket.engine_id
        if not found:
            raise BadInput("The build has no engine yet (it was not waited for).")
        return str(found)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": self.ticket.cache,
            "engine_id": (self.engine or {}).get("id") or self.ticket.engine_id,
            "build_id": self.ticket.job_id,
            "joined_existing": self.ticket.joined_existing,
            "precision_choice": (self.job.result or {}).get("precision_choice")
            if self.job
            else self.ticket.precision_choice,
            "job": self.job.document if self.job else None,
            "engine": self.engine,
        }


def _confirm(question: str) -> bool:
    import typer

    return bool(typer.confirm(question, default=False, err=True))


def wait_for_job(api: ApiClient, out: Output, ref: JobRef, *, on_interrupt: InterruptPolicy) -> JobState:
    """Follow ``ref`` with progress to its end; its final state when it succeeded, else JobUnsuccessful."""
    with out.progress(f"{ref.kind} {ref.id[:12]}") as progress:
        state = follow_job(api, ref, progress, on_interrupt=on_interrupt, confirm_cancel=_confirm)
    done = require_success(state, ref)
    report_shortfalls(out, done)
    return done


def report_shortfalls(out: Output, state: JobState) -> None:
    """An INT8 result below its accuracy target, or slower than FP32, is said on stderr in every mode."""
    if state.document.get("target_met") is False:
        out.warning(f"{ref_name(state)} is BELOW its accuracy target: this INT8 result is worse than FP32.")
    for text in state.document.get("warnings") or []:
        out.warning(str(text))


def ref_name(state: JobState) -> str:
    return f"{state.kind} {state.id[:12]}"


def parse_shape_ranges(values: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """``NAME=MIN:OPT:MAX`` with dims joined by ``x`` (``input=1x3x224x224:8x3x224x224:16x3x224x224``)."""
    ranges: dict[str, dict[str, list[int]]] = {}
    for value in values:
        name, sep, spec = value.partition("=")
        parts = spec.split(":")
        if not sep or not name or len(parts) != 3:
            raise BadInput(
                f"--shape '{value}': write NAME=MIN:OPT:MAX, e.g. input=1x3x224x224:8x3x224x224:16x3x224x224."
            )
        try:
            dims = [[int(d) for d in part.lower().split("x")] for part in parts]
        except ValueError as exc:
            raise BadInput(f"--shape '{value}': dims must be whole numbers joined by 'x'.") from exc
        ranges[name] = {"min": dims[0], "opt": dims[1], "max": dims[2]}
    return ranges


def build_engine(
    api: ApiClient,
    out: Output,
    body: Mapping[str, Any],
    *,
    wait: bool = True,
    on_interrupt: InterruptPolicy = "ask",
) -> BuildOutcome:
    """POST /v1/builds; on a miss follow the job (unless ``wait`` is off) and read the engine."""
    ticket = api.create_build(body)
    if ticket.cache == "hit":
        if ticket.engine_id is None:
            raise BadInput("The server answered a cache hit without an engine id; it may be incompatible.")
        out.note(f"engine {ticket.engine_id} is already built (cache hit)")
        if ticket.precision_choice:
            choice = ticket.precision_choice
            out.note(f"precision auto chose {choice.get('chosen')}: {choice.get('reason')}")
        return BuildOutcome(ticket=ticket, job=None, engine=api.engine(ticket.engine_id))
    if ticket.job_id is None:
        raise BadInput("The server answered a cache miss without a build job id; it may be incompatible.")
    joined = " (joined an identical build already queued)" if ticket.joined_existing else ""
    target = f"engine {ticket.engine_id}" if ticket.engine_id else "precision auto (engine chosen at the end)"
    out.note(f"build {ticket.job_id} queued for {target}{joined}")
    if not wait:
        return BuildOutcome(ticket=ticket, job=api.job("build", ticket.job_id), engine=None)
    job = wait_for_job(api, out, JobRef("build", ticket.job_id), on_interrupt=on_interrupt)
    engine_id = job.document.get("engine_id") or (job.result or {}).get("engine_id") or ticket.engine_id
    if not engine_id:
        raise BadInput(
            f"Build {ticket.job_id} succeeded without naming its engine; the server may be incompatible."
        )
    chosen = (job.result or {}).get("precision_choice")
    if chosen:
        out.note(f"precision auto chose {chosen.get('chosen')}: {chosen.get('reason')}")
    return BuildOutcome(ticket=ticket, job=job, engine=api.engine(str(engine_id)))


def download_plan(api: ApiClient, engine_id: str, destination: Path | None) -> DownloadedFile:
    """The engine's plan file, written only once its sha256 matches the server's."""
    return api.download(f"/v1/engines/{engine_id}/plan", destination, default_name=f"{engine_id[:16]}.plan")


def engine_input_specs(api: ApiClient, engine: Document) -> list[Document]:
    """The input specs of the exact ONNX the engine was built from (its dtypes may differ: FP16)."""
    model_id = engine.get("built_model_id") or engine.get("model_id")
    if not model_id:
        raise BadInput(f"Engine {engine.get('id')} does not name the model it was built from.")
    return list(api.model(str(model_id)).get("inputs", []))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Save ``arrays`` as an .npz at ``path`` atomically (a temporary file renamed into place)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed or removed
        dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False
    )
    try:
        with handle:
            np.savez(handle, allow_pickle=False, **dict(arrays))
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, document: Any) -> Path:
    """Write ``document`` as indented JSON at ``path`` atomically."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, renamed or removed
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".part", delete=False
    )
    try:
        with handle:
            json.dump(document, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return path
