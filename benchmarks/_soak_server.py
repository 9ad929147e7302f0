"""The soak's server: a ``serve`` process on a data directory, and its memory read from /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
# Besides the defaults: a small engine cache so that eviction happens, two job workers.
SERVER_SETTINGS = {"ENGINE_CACHE_BYTES": str(256 * 1024), "JOB_WORKERS": "2"}


class Server:
    """``python -m service.cli.main serve`` on a data directory, and its memory from /proc."""

    def __init__(self, root: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_SERVICE_")}
        env.update({f"ENGINE_SERVICE_{key}": value for key, value in SERVER_SETTINGS.items()})
        env.update(
            ENGINE_SERVICE_PORT=str(self.port),
            ENGINE_SERVICE_LOG_FILE=str(root / "service.log"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        self.log = (root / "server.out").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli.main", "serve", "--log-level", "warning"],
            cwd=root,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def rss_mib(self) -> tuple[float, float]:
        """(the server's RSS, the RSS of the server and all its descendants), in MiB."""
        own = _status_kib(self.process.pid, "VmRSS")
        total = own + sum(_status_kib(pid, "VmRSS") for pid in _descendants(self.process.pid))
        return own / 1024, total / 1024

    def peak_mib(self) -> float:
        return _status_kib(self.process.pid, "VmHWM") / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(child) for child in children]
        stack += [int(child) for child in children]
    return found
