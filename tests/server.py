"""A real uvicorn server on a loopback port, run in a thread, for API tests over real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from service.app import create_app
from service.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(root: Path, **overrides: Any) -> Settings:
    """Settings with every data root under ``root`` (no environment leaks into tests)."""
    values: dict[str, Any] = {
        "engines_dir": root / "engines",
        "calibration_dir": root / "calibration_data",
        "models_dir": root / "models",
        "database_path": root / "engine_service.db",
        "host": "127.0.0.1",
        "port": free_port(),
        # Service log lines go to a file beside the data, never between pytest's progress lines.
        "log_file": root / "service.log",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@contextmanager
def running_server(settings: Settings) -> Iterator[httpx.Client]:
    """Start the app under uvicorn in a thread; yield a client bound to it; stop it cleanly."""
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    base_url = f"http://{settings.host}:{settings.port}"
    try:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(timeout=60)
