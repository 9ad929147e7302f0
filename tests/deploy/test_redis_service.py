"""compose.yaml's `redis` service run for real: its start script, with and without a password, and its
health check, against a real redis-server.

The script and the check run as Compose hands them to the container (interpolated, ``sh -c``), with two
stand-ins on PATH for what only the image has: ``docker-entrypoint.sh`` records what it was asked to
start and starts it on a free loopback port in a temporary folder; ``redis-cli`` adds that port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_files import interpolated_compose

redis = pytest.importorskip("redis", reason="the redis client (a service dependency) is not installed")

PASSWORD = "0123456789abcdef" * 4
ENTRYPOINT = """#!/bin/sh
printf '%s\\n' "$@" > "$TEST_ARGS_FILE"
[ "$1" = redis-server ] || exit 97
shift
exec "$TEST_REDIS_SERVER" "$@" --port "$TEST_PORT" --dir "$TEST_DIR" --save ""
"""
CLI = """#!/bin/sh
exec "$TEST_REDIS_CLI" -p "$TEST_PORT" "$@"
"""


@dataclass
class RedisService:
    """One start of the compose `redis` service's command, and its health check."""

    process: subprocess.Popen[str]
    environ: dict[str, str]  # the container's environment plus the stand-ins' settings
    healthcheck: list[str]
    args_file: Path
    port: int

    def check(self, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        """Run the health check as Docker does (CMD-SHELL: sh -c), optionally without some variables."""
        assert self.healthcheck[0] == "CMD-SHELL"
        environ = {name: value for name, value in self.environ.items() if name not in drop}
        return subprocess.run(
            ["sh", "-c", self.healthcheck[1]], env=environ, capture_output=True, text=True, timeout=10
        )

    def wait_healthy(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.check().returncode != 0:
            assert self.process.poll() is None, f"redis exited: {self.process.communicate()}"
            assert time.monotonic() < deadline, "redis never passed its health check"
            time.sleep(0.05)

    def started_with(self) -> list[str]:
        return self.args_file.read_text(encoding="utf-8").splitlines()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Any]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("redis-server / redis-cli are not installed (Debian: apt-get install redis-server)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {"docker-entrypoint.sh": ENTRYPOINT, "redis-cli": CLI}.items():
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    started: list[RedisService] = []

    def start(environ: Mapping[str, str]) -> RedisService:
        service = interpolated_compose(environ)["services"]["redis"]
        port = _free_port()
        data = tmp_path / f"data-{port}"
        data.mkdir()
        container = {
            **{name: str(value) for name, value in service["environment"].items()},
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "TEST_ARGS_FILE": str(data / "args"),
            "TEST_REDIS_SERVER": server,
            "TEST_REDIS_CLI": cli,
            "TEST_PORT": str(port),
            "TEST_DIR": str(data),
        }
        process = subprocess.Popen(
            service["command"], env=container, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        handle = RedisService(process, container, service["healthcheck"]["test"], data / "args", port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.process.poll() is None:
            handle.process.terminate()
            handle.process.communicate(timeout=10)


def test_without_a_password_redis_stays_on_loopback_and_needs_none(start_redis: Any) -> None:
    service = start_redis({})

    service.wait_healthy()

    assert service.started_with() == ["redis-server", "--appendonly", "yes"]
    assert redis.Redis(port=service.port).ping()


def test_with_a_password_redis_requires_it_and_the_health_check_sends_it(start_redis: Any) -> None:
    service = start_redis({"ENGINE_REDIS_PASSWORD": PASSWORD, "ENGINE_REDIS_PUBLISH_ADDRESS": "10.0.0.5"})

    service.wait_healthy()

    assert service.started_with() == ["redis-server", "--appendonly", "yes", "--requirepass", PASSWORD]
    assert redis.Redis.from_url(f"redis://:{PASSWORD}@127.0.0.1:{service.port}/0").ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=service.port).ping()
    # redis-cli answers NOAUTH with exit status 0: only the PONG check makes this fail.
    assert service.check(drop=("ENGINE_REDIS_PASSWORD",)).returncode != 0


def test_the_health_check_fails_once_redis_is_down(start_redis: Any) -> None:
    service = start_redis({"ENGINE_REDIS_PASSWORD": PASSWORD})
    service.wait_healthy()

    service.process.terminate()
    service.process.communicate(timeout=10)

    assert service.check().returncode != 0


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        pytest.param(
            {"ENGINE_REDIS_PUBLISH_ADDRESS": "0.0.0.0"}, "without a password", id="open-no-password"
        ),
        pytest.param(
            {"ENGINE_REDIS_PUBLISH_ADDRESS": "10.0.0.5", "ENGINE_REDIS_PASSWORD": ""},
            "without a password",
            id="private-empty-password",
        ),
        pytest.param({"ENGINE_REDIS_PASSWORD": "short"}, "at least 16 characters", id="short"),
        pytest.param(
            {"ENGINE_REDIS_PASSWORD": "p@ss/word:" + PASSWORD}, "letters, digits", id="not-url-safe"
        ),
    ],
)
def test_redis_refuses_to_start_with_an_unsafe_password(
    start_redis: Any, environ: dict[str, str], message: str
) -> None:
    service = start_redis(environ)

    _, stderr = service.process.communicate(timeout=10)

    assert service.process.returncode == 2
    assert message in stderr
    assert not service.args_file.exists(), "the server must not have been started"
