"""Hostile-input fixtures: a real server process per test, with its peak memory read from /proc.

The server runs as a child process (``python -m service.cli.main serve``), not a thread, so its peak
resident set (VmHWM) is the server's alone and a refusal can be held to a memory bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from tests.restart.server_process import DataDir, ServerProcess, running

MIB_IN_KIB = 1024
StartServer = Callable[..., AbstractContextManager[ServerProcess]]


class MemoryWatch:
    """The server's peak RSS before and after some requests, in MiB."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.before_mib = server.memory_kib() / MIB_IN_KIB

    def growth_mib(self) -> float:
        """How far the peak resident set rose since this watch began."""
        return self.server.memory_kib() / MIB_IN_KIB - self.before_mib


@pytest.fixture
def server_process(tmp_path: Path) -> StartServer:
    """Start a server process on a fresh data directory: `with server_process(MAX_UPLOAD_BYTES="10") as s:`.

    Keyword arguments are settings without the ENGINE_SERVICE_ prefix.
    """

    @contextmanager
    def start(**settings: str) -> Iterator[ServerProcess]:
        env = {f"ENGINE_SERVICE_{key.upper()}": value for key, value in settings.items()}
        with running(DataDir(tmp_path / "data"), "server.log", env) as server:
            server.client.get("/v1/models").raise_for_status()  # routes imported and warm
            yield server

    return start
