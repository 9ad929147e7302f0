"""How the client CLI writes: results on stdout, progress and messages on stderr.

Contract:

- :class:`Output` is made once per command, after the command started (so it writes to whatever
  ``sys.stdout``/``sys.stderr`` are then). With ``--json`` the command's result is one JSON document on
  stdout and nothing else is written there; progress and notes are left out, errors still go to
  stderr. Without it, results are rich tables on stdout (markup off: ids and node names print as
  they are) and notes go to stderr.
- :class:`JobProgress` shows a job while it is polled: a live bar when stderr is a terminal, one line
  per change of status or phase otherwise (logs, CI), nothing in JSON mode. New job log lines are
  printed above the bar as they appear.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.progress import Progress, TaskID

    from service.cli.client_api import DownloadedFile, JobState

# Width for tables when stdout is not a terminal: wide enough for 64-hex ids, so piped output does
# not fold them (rich would otherwise assume 80 columns).
PIPE_WIDTH = 200
ProgressMode = Literal["bar", "lines", "quiet"]


def _console(stream: TextIO) -> Console:
    from rich.console import Console

    terminal = stream.isatty()
    return Console(
        file=stream,
        markup=False,
        highlight=False,
        emoji=False,
        width=None if terminal else PIPE_WIDTH,
        force_terminal=None if terminal else False,
        soft_wrap=not terminal,
    )


def new_log_lines(seen: Sequence[str], tail: Sequence[str]) -> list[str]:
    """The lines of ``tail`` not yet shown, given the ``seen`` tail of an earlier poll.

    A job's log tail is a sliding window, so the new lines are what follows the longest overlap of the
    end of ``seen`` with the start of ``tail``.
    """
    for overlap in range(min(len(seen), len(tail)), 0, -1):
        if list(seen[-overlap:]) == list(tail[:overlap]):
            return list(tail[overlap:])
    return list(tail)


class Output:
    """Where one command writes its result, notes, errors and progress."""

    def __init__(self, *, as_json: bool, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.as_json = as_json
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        self._out: Console | None = None
        self._err: Console | None = None

    @property
    def out(self) -> Console:
        if self._out is None:
            self._out = _console(self._stdout)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            self._err = _console(self._stderr)
        return self._err

    def document(self, data: Any) -> None:
        """The command's result as JSON on stdout (only in JSON mode)."""
        self._stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        self._stdout.flush()

    def result(self, document: Any, *renderables: RenderableType | str) -> None:
        """The command's result: ``document`` as JSON in JSON mode, else the tables (or lines of text)."""
        if self.as_json:
            self.document(document)
            return
        for renderable in renderables:
            if isinstance(renderable, str):
                self.line(renderable)
            else:
                self.out.print(renderable)

    def show(self, *renderables: RenderableType) -> None:
        """Tables or text as the human-readable result on stdout."""
        for renderable in renderables:
            self.out.print(renderable)

    def line(self, text: str) -> None:
        """One plain result line on stdout (human mode)."""
        self._stdout.write(text + "\n")
        self._stdout.flush()

    def downloaded(self, saved: DownloadedFile) -> None:
        """The result of a download command: where the file went and whether its checksum was verified."""
        check = "sha256 verified" if saved.verified else "no checksum from the server"
        document = {
            "path": str(saved.path),
            "sha256": saved.sha256,
            "size_bytes": saved.size_bytes,
            "verified": saved.verified,
        }
        self.result(document, f"wrote {saved.path} ({saved.size_bytes} bytes, {check})")

    def note(self, text: str) -> None:
        """A message for the person on stderr; silent in JSON mode."""
        if not self.as_json:
            self._stderr.write(text + "\n")
            self._stderr.flush()

    def warning(self, text: str) -> None:
        """A warning on stderr, in every mode (JSON goes to stdout, so it stays parseable)."""
        self._stderr.write(f"warning: {text}\n")
        self._stderr.flush()

    def error(self, text: str) -> None:
        """An error on stderr, in every mode."""
        self._stderr.write(f"error: {text}\n")
        self._stderr.flush()

    def progress(self, label: str) -> JobProgress:
        if self.as_json:
            mode: ProgressMode = "quiet"
        else:
            mode = "bar" if self._stderr.isatty() else "lines"
        return JobProgress(self.err, self._stderr, label, mode)


class JobProgress:
    """Renders successive polls of one job; a context manager that stops the live bar on exit."""

    def __init__(self, console: Console, stream: TextIO, label: str, mode: ProgressMode) -> None:
        self.console = console
        self.stream = stream
        self.label = label
        self.mode = mode
        self._seen_log: tuple[str, ...] = ()
        self._last_line: tuple[str, str] | None = None
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def update(self, state: JobState) -> None:
        if self.mode == "quiet":
            return
        fresh = new_log_lines(self._seen_log, state.log_tail)
        self._seen_log = state.log_tail
        if self.mode == "lines":
            self._lines(state, fresh)
        else:
            self._update_bar(state, fresh)

    def _lines(self, state: JobState, fresh: list[str]) -> None:
        for line in fresh:
            self.stream.write(f"  | {line}\n")
        key = (state.status, state.phase)
        if key != self._last_line:
            self._last_line = key
            phase = f" {state.phase}" if state.phase else ""
            self.stream.write(f"{self.label}: {state.status}{phase} {state.progress:.0%}\n")
        self.stream.flush()

    def _update_bar(self, state: JobState, fresh: list[str]) -> None:
        bar, task = self._bar_and_task()
        for line in fresh:
            bar.console.print(f"  | {line}")
        phase = f" {state.phase}" if state.phase else ""
        bar.update(task, completed=state.progress, description=f"{self.label}: {state.status}{phase}")

    def _bar_and_task(self) -> tuple[Progress, TaskID]:
        """The live bar, started on the first poll (so a command that never polls draws nothing)."""
        if self._bar is not None and self._task is not None:
            return self._bar, self._task
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        bar = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        bar.start()
        self._bar, self._task = bar, bar.add_task(self.label, total=1.0)
        return bar, self._task

    def stop(self) -> None:
        """Stop the live bar (idempotent), leaving its last state on screen."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = self._task = None
