"""Following a server job to its end, and what Ctrl-C means while doing so.

Contract: :func:`follow_job` polls a job (build, quantization, report) until it is succeeded, failed
or cancelled, handing every poll to a :class:`~service.cli.render.JobProgress`, and returns the final
:class:`~service.cli.client_api.JobState`. It does not judge the outcome; :func:`require_success`
turns a failed or cancelled job into a :class:`JobUnsuccessful` naming the job and its error.

On Ctrl-C the :data:`InterruptPolicy` decides: ``cancel`` asks the server to cancel and waits briefly
for the job to stop; ``detach`` leaves it running and says how to pick it up again; ``ask`` asks the
person which of the two, and detaches when stdin is not a terminal (a script's Ctrl-C or SIGINT
must not cancel server work it may not own). Both end in :class:`JobInterrupted` (exit code 130).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from service.cli.client_api import ApiClient, JobKind, JobState
from service.cli.render import JobProgress
from service.errors import JobInterrupted, JobUnsuccessful

InterruptPolicy = Literal["ask", "cancel", "detach"]
FIRST_POLL_S = 0.2
MAX_POLL_S = 1.0
CANCEL_WAIT_S = 30.0
# The command that picks a job up again after detaching, per kind.
FOLLOW_COMMANDS: dict[str, str] = {
    "build": "engine-service builds wait {id}",
    "quantization": "engine-service quantizations wait {id}",
    "report": "engine-service reports show {id} --wait",
}


@dataclass(frozen=True)
class JobRef:
    """A job on the server: its kind decides where it is polled and cancelled."""

    kind: JobKind
    id: str

    @property
    def follow_command(self) -> str:
        return FOLLOW_COMMANDS[self.kind].format(id=self.id)


def stdin_is_interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def follow_job(
    api: ApiClient,
    ref: JobRef,
    progress: JobProgress,
    *,
    on_interrupt: InterruptPolicy = "ask",
    confirm_cancel: Callable[[str], bool] | None = None,
) -> JobState:
    """Poll ``ref`` until it finishes; see the module docstring for Ctrl-C."""
    try:
        return _poll_until_finished(api, ref, progress)
    except KeyboardInterrupt:
        progress.stop()
        if _should_cancel(ref, on_interrupt, confirm_cancel):
            raise _cancelled(api, ref) from None
        raise JobInterrupted(
            f"Detached from {ref.kind} {ref.id}; it keeps running on the server. "
            f"Follow it again with `{ref.follow_command}`.",
            cancelled=False,
        ) from None


def _poll_until_finished(api: ApiClient, ref: JobRef, progress: JobProgress) -> JobState:
    interval = FIRST_POLL_S
    while True:
        state = api.job(ref.kind, ref.id)
        progress.update(state)
        if state.finished:
            return state
        time.sleep(interval)
        interval = min(MAX_POLL_S, interval * 1.5)  # quick feedback first, then light polling


def _should_cancel(ref: JobRef, policy: InterruptPolicy, confirm: Callable[[str], bool] | None) -> bool:
    if policy != "ask":
        return policy == "cancel"
    if confirm is None or not stdin_is_interactive():
        return False
    try:
        return confirm(f"Cancel {ref.kind} {ref.id} on the server? (No detaches and lets it finish)")
    except (KeyboardInterrupt, EOFError):
        return False  # a second Ctrl-C at the prompt means "just leave"


def _cancelled(api: ApiClient, ref: JobRef) -> JobInterrupted:
    state = api.cancel_job(ref.kind, ref.id)
    deadline = time.monotonic() + CANCEL_WAIT_S
    try:
        # A running job stops at its next checkpoint; wait a little so the message can say it stopped.
        while not state.finished and time.monotonic() < deadline:
            time.sleep(FIRST_POLL_S)
            state = api.job(ref.kind, ref.id)
    except KeyboardInterrupt:
        pass  # asked again: stop waiting, the cancellation request already reached the server
    if state.status == "cancelled":
        return JobInterrupted(f"Cancelled {ref.kind} {ref.id}.", cancelled=True)
    if state.finished:
        return JobInterrupted(
            f"{ref.kind.capitalize()} {ref.id} finished as {state.status} before the cancellation took "
            f"effect; see `{ref.follow_command}`.",
            cancelled=False,
        )
    return JobInterrupted(
        f"Asked the server to cancel {ref.kind} {ref.id}; it stops at its next checkpoint "
        f"(check with `{ref.follow_command}`).",
        cancelled=True,
    )


def require_success(state: JobState, ref: JobRef) -> JobState:
    """``state`` when it succeeded; otherwise JobUnsuccessful with the job's error and last log lines."""
    if state.status == "succeeded":
        return state
    reason = state.error or "no error recorded"
    log = "".join(f"\n  | {line}" for line in state.log_tail[-5:])
    raise JobUnsuccessful(f"{ref.kind.capitalize()} {ref.id} {state.status}: {reason}{log}", state)
