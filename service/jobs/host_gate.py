"""Exclusive jobs: latency measurements run alone on the host, every other job waits for them.

A benchmark measured while a calibration or an evaluation shares the CPUs reports the contention, not
the engine. :class:`HostGate` is a reader-writer lock over two files in a directory on the host
(``fcntl.flock``), so it holds across the threads of one process and across the worker processes of
one host that share the service's data directory:

- an ordinary job holds the *run* lock shared for as long as it runs;
- an exclusive job (benchmarks, comparisons) holds it exclusively, so it starts only once every
  ordinary job has finished, and none starts while it runs;
- a *turnstile* lock keeps a waiting exclusive job from being starved: it holds the turnstile while it
  waits, and ordinary jobs pass the turnstile before taking their shared lock.

Waiting polls (:data:`POLL_S`) so the job can still be cancelled; the wait callback is told how long it
has waited. Locks are released when the job ends, whatever the outcome, and by the kernel when the
process dies. Hosts without ``fcntl`` (Windows) get a gate that never waits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

POLL_S = 0.05
WaitCallback = Callable[[float], None]  # called while waiting, with the seconds waited; may raise


class HostGate:
    """Shared / exclusive admission of jobs on this host (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.run_path = directory / "jobs.run.lock"
        self.turnstile_path = directory / "jobs.turnstile.lock"

    @contextmanager
    def shared(self, waiting: WaitCallback | None = None) -> Iterator[float]:
        """Hold the gate with other ordinary jobs; yields the seconds spent waiting for it."""
        started = time.monotonic()
        with _locked(self.turnstile_path, exclusive=True, waiting=waiting, started=started):
            pass  # only passing through: an exclusive job waiting here goes first
        with _locked(self.run_path, exclusive=False, waiting=waiting, started=started):
            yield time.monotonic() - started

    @contextmanager
    def exclusive(self, waiting: WaitCallback | None = None) -> Iterator[float]:
        """Hold the gate alone; yields the seconds spent waiting for the other jobs to finish."""
        started = time.monotonic()
        with (
            _locked(self.turnstile_path, exclusive=True, waiting=waiting, started=started),
            _locked(self.run_path, exclusive=True, waiting=waiting, started=started),
        ):
            yield time.monotonic() - started


@contextmanager
def _locked(path: Path, *, exclusive: bool, waiting: WaitCallback | None, started: float) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock on this platform: never wait
        yield
        return
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                fcntl.flock(descriptor, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waiting is not None:
                    waiting(time.monotonic() - started)
                time.sleep(POLL_S)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock
