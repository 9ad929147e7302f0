"""docker/healthcheck.py, run as the images run it: a separate process, configured by the environment."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType

import httpx
import pytest

from tests.deploy.deploy_files import DOCKER_DIR
from tests.server import free_port

SCRIPT = DOCKER_DIR / "healthcheck.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("engine_service_healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(port: int, **extra_env: str) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if not key.upper().endswith("_PROXY")}
    environ.update({"ENGINE_SERVICE_HOST": "0.0.0.0", "ENGINE_SERVICE_PORT": str(port), **extra_env})
    return subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=30, env=environ, check=False
    )


@contextmanager
def _answering(status: int) -> Iterator[int]:
    """A loopback HTTP server whose every GET answers ``status``; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_passes_against_the_real_server(api: httpx.Client) -> None:
    port = api.base_url.port
    assert port is not None

    result = _run(port)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_healthcheck_ignores_proxy_settings_meant_for_outbound_traffic(api: httpx.Client) -> None:
    port = api.base_url.port
    assert port is not None
    dead_proxy = f"http://127.0.0.1:{free_port()}"

    result = _run(port, HTTP_PROXY=dead_proxy, http_proxy=dead_proxy)

    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_liveness_answers_503() -> None:
    with _answering(503) as port:
        result = _run(port)

    assert result.returncode == 1
    assert f"http://127.0.0.1:{port}/healthz answered HTTP 503" in result.stderr


def test_healthcheck_fails_with_a_reason_when_nothing_listens() -> None:
    port = free_port()

    result = _run(port)

    assert result.returncode == 1
    assert result.stderr.startswith(f"unhealthy: http://127.0.0.1:{port}/healthz is not reachable")


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        ({}, "http://127.0.0.1:8000/healthz"),
        ({"ENGINE_SERVICE_HOST": "0.0.0.0", "ENGINE_SERVICE_PORT": "9000"}, "http://127.0.0.1:9000/healthz"),
        ({"ENGINE_SERVICE_HOST": "::"}, "http://[::1]:8000/healthz"),
        ({"ENGINE_SERVICE_HOST": "10.1.2.3"}, "http://10.1.2.3:8000/healthz"),
        ({"ENGINE_SERVICE_HOST": "fd00::5", "ENGINE_SERVICE_PORT": " "}, "http://[fd00::5]:8000/healthz"),
    ],
)
def test_health_url_follows_the_servers_bind_settings(environ: dict[str, str], url: str) -> None:
    assert _load_script().health_url(environ) == url
