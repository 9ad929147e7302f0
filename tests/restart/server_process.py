"""A real server process on a data directory, killed with SIGKILL and started again.

``ServerProcess`` runs ``python -m service.cli.main serve`` with every ``ENGINE_SERVICE_*`` setting
pointing into one data directory (no environment or ``.env`` leaks in: the process runs with that
directory as its working directory). ``StoredState`` reads what a server left on disk straight from
the SQLite file and the folders, without going through the service, so tests can compare the
index with the files after a crash.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # a cold start imports onnx, onnxruntime and numpy on a loaded 2-core machine
FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class DataDir:
    """Where one service keeps everything: the same paths across restarts."""

    root: Path

    @property
    def engines(self) -> Path:
        return self.root / "engines"

    @property
    def plans(self) -> Path:
        return self.engines / "plans"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration_data"

    @property
    def database(self) -> Path:
        return self.root / "engine_service.db"

    def environment(self, port: int, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("ENGINE_SERVICE_")}
        env.update(
            ENGINE_SERVICE_ENGINES_DIR=str(self.engines),
            ENGINE_SERVICE_CALIBRATION_DIR=str(self.calibration),
            ENGINE_SERVICE_MODELS_DIR=str(self.models),
            ENGINE_SERVICE_DATABASE_PATH=str(self.database),
            ENGINE_SERVICE_HOST="127.0.0.1",
            ENGINE_SERVICE_PORT=str(port),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        )
        env.update(overrides or {})
        return env


class ServerProcess:
    """One ``serve`` process; ``kill()`` is SIGKILL, so nothing in the service gets to clean up."""

    def __init__(self, data: DataDir, log_name: str, settings: Mapping[str, str] | None = None) -> None:
        self.data = data
        self.port = free_port()
        self.log_path = data.root / log_name
        data.root.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--log-level", "warning"],
            cwd=data.root,
            env=data.environment(self.port, settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.client.get("/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, then reap: the process gets no chance to finish, flush or clean anything."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        assert self.process.returncode == -signal.SIGKILL

    def stop(self) -> None:
        """Graceful stop for the end of a test (SIGTERM, then SIGKILL if it hangs)."""
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self._log.close()

    def memory_kib(self, field: str = "VmHWM") -> int:
        """A memory figure of the server process from /proc (VmHWM: peak resident set; VmRSS: now), in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"/proc/{self.process.pid}/status has no {field}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")


@contextmanager
def running(
    data: DataDir, log_name: str, settings: Mapping[str, str] | None = None
) -> Iterator[ServerProcess]:
    """A started, ready server on ``data`` with extra ENGINE_SERVICE_* ``settings``; stopped at the end."""
    server = ServerProcess(data, log_name, settings)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def poll(
    fetch: Callable[[], dict[str, Any]],
    until: Callable[[dict[str, Any]], bool],
    *,
    timeout_s: float,
    what: str,
) -> dict[str, Any]:
    """Fetch a resource every 20 ms until ``until`` holds; fail with the last state at the deadline."""
    deadline = time.monotonic() + timeout_s
    state = fetch()
    while not until(state):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last state: {state}")
        if state.get("status") in FINAL:
            raise AssertionError(f"the job ended before {what}: {state}")
        time.sleep(0.02)
        state = fetch()
    return state


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredState:
    """Rows and files as they are on disk (read with the server stopped or idle)."""

    engine_rows: dict[str, str]  # engine id -> plan sha256
    model_rows: frozenset[str]
    calibration_rows: frozenset[str]
    job_status: dict[str, str]
    plan_files: dict[str, Path]  # sha256 -> file
    model_files: dict[str, Path]
    calibration_dirs: frozenset[str]
    temporaries: tuple[Path, ...]  # anything named .tmp-* anywhere under the data root

    @classmethod
    def read(cls, data: DataDir) -> StoredState:
        with closing(sqlite3.connect(f"file:{data.database}?mode=ro", uri=True)) as db:
            engines = dict(db.execute("SELECT id, plan_sha256 FROM engines").fetchall())
            models = frozenset(row[0] for row in db.execute("SELECT id FROM models"))
            sets = frozenset(row[0] for row in db.execute("SELECT id FROM calibration_sets"))
            jobs = dict(db.execute("SELECT id, status FROM jobs").fetchall())
        return cls(
            engine_rows=engines,
            model_rows=models,
            calibration_rows=sets,
            job_status=jobs,
            plan_files={path.name: path for path in data.plans.glob("??/*")},
            model_files={path.name.removesuffix(".onnx"): path for path in data.models.glob("??/*.onnx")},
            calibration_dirs=frozenset(
                path.name for path in data.calibration.iterdir() if path.is_dir() and len(path.name) == 64
            ),
            temporaries=tuple(sorted(data.root.rglob(".tmp-*"))),
        )
