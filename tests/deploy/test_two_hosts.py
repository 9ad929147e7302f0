"""The two-host setup exactly as README.md and docker/README.md write it.

Each README has a shell block for host A (API server, Redis, a local worker) that writes host A's
``.env`` and host B's ``remote-worker.env``, and a block for host B (remote workers) that uses that file
as its ``.env``. The tests run host A's shell lines for real (bash and openssl; only the ``docker``
commands are left out), then resolve every documented ``docker compose`` command with nothing but the
variables of the host it runs on, and check what each service gets, down to the real ``Settings``.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from service.auth.keys import KeyStore
from service.config import Settings
from service.store.db import Database
from tests.deploy.deploy_files import (
    DOCKER_DIR,
    DOCKERFILES,
    ENV_PREFIX,
    REPO_ROOT,
    ComposeCommand,
    compose_commands,
    host_blocks,
    interpolated_compose,
    read_env_file,
    read_stages,
    reserves_gpu,
    services_started,
    shell_lines,
)

DOCS = {"README.md": REPO_ROOT / "README.md", "docker/README.md": DOCKER_DIR / "README.md"}
API_SERVICES = {"engine-service", "engine-service-cpu"}
LOCAL_WORKERS = {"worker", "worker-cpu"}
HOST_B_VARIABLES = {"ENGINE_SERVICE_API_URL", "ENGINE_SERVICE_WORKER_TOKEN", "ENGINE_SERVICE_REDIS_URL"}


@dataclass(frozen=True)
class Host:
    environ: dict[str, str]  # its .env, as the documented shell lines wrote it
    commands: list[ComposeCommand]


@dataclass(frozen=True)
class Setup:
    a: Host
    b: Host
    b_text: str  # host B's blocks, for what cannot run here (copying the file over)


@pytest.fixture(scope="module", params=sorted(DOCS))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    for tool in ("bash", "openssl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the documented host A lines need it")
    doc = DOCS[request.param]
    a_blocks, b_blocks = host_blocks(doc, "A"), host_blocks(doc, "B")
    assert a_blocks and b_blocks, f"{request.param} has no '# host A' / '# host B' shell blocks"
    workdir = tmp_path_factory.mktemp("host-a")
    script = "".join(shell_lines(block) for block in a_blocks)
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        check=True,
        timeout=30,
    )
    a_commands = [command for block in a_blocks for command in compose_commands(block)]
    b_commands = [command for block in b_blocks for command in compose_commands(block)]
    return Setup(
        a=Host(read_env_file(workdir / ".env"), a_commands),
        b=Host(read_env_file(workdir / "remote-worker.env"), b_commands),
        b_text="\n".join(b_blocks),
    )


def _compose(host: Host, command: ComposeCommand) -> dict[str, Any]:
    # A variable set on the command line wins over .env, as in Compose.
    return interpolated_compose({**host.environ, **command.environ})


def _ups(host: Host) -> list[ComposeCommand]:
    ups = [command for command in host.commands if command.subcommand == "up"]
    assert ups, "no documented `docker compose up` for this host"
    return ups


def _settings(compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The real Settings inside a service's container: image ENV first, compose environment on top."""
    image = "cpu" if name.endswith("-cpu") else "gpu"
    service = compose["services"][name]
    environment = {**read_stages(DOCKERFILES[image])[-1].environment(), **service["environment"]}
    for variable, value in environment.items():
        if variable.startswith(ENV_PREFIX):
            monkeypatch.setenv(variable, str(value))
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_host_b_uses_the_file_host_a_wrote_for_it(setup: Setup) -> None:
    assert "remote-worker.env" in setup.b_text and ".env" in setup.b_text
    # Only what a worker host needs: no API key, no Redis server settings.
    assert set(setup.b.environ) == HOST_B_VARIABLES
    assert all(setup.b.environ.values())


def test_host_a_commands_start_an_api_server_redis_and_a_local_worker(setup: Setup) -> None:
    for command in _ups(setup.a):
        compose = _compose(setup.a, command)
        started = services_started(compose, command.profiles, command.services)

        assert "redis" in started, command.line
        assert len(started & API_SERVICES) == 1, command.line
        assert len(started & LOCAL_WORKERS) == 1, command.line
        assert "remote-worker" not in started, command.line
        if "engine-service-cpu" in started:
            assert not any(reserves_gpu(compose["services"][name]) for name in started), command.line


def test_host_a_publishes_redis_on_its_private_address_with_the_password(setup: Setup) -> None:
    address = setup.a.environ["ENGINE_REDIS_PUBLISH_ADDRESS"]
    for command in _ups(setup.a):
        redis = _compose(setup.a, command)["services"]["redis"]

        assert redis["ports"] == [f"{address}:6379:6379"]
        assert redis["environment"]["ENGINE_REDIS_PASSWORD"] == setup.a.environ["ENGINE_REDIS_PASSWORD"]
        assert len(redis["environment"]["ENGINE_REDIS_PASSWORD"]) >= 16


def test_host_a_services_reach_redis_with_its_password_and_take_the_worker_token(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = setup.a.environ["ENGINE_REDIS_PASSWORD"]
    for command in _ups(setup.a):
        compose = _compose(setup.a, command)
        for name in services_started(compose, command.profiles, command.services) - {"redis"}:
            settings = _settings(compose, name, monkeypatch)
            url = urlsplit(settings.redis_url)

            assert settings.queue_backend == "redis", name
            assert (url.hostname, url.port, url.password) == ("redis", 6379, password), name
            if name in API_SERVICES:
                assert settings.worker_token_value() == setup.b.environ["ENGINE_SERVICE_WORKER_TOKEN"]


def test_host_a_api_server_accepts_the_documented_bootstrap_key(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = _compose(setup.a, _ups(setup.a)[0])
    settings = _settings(compose, "engine-service", monkeypatch)
    assert settings.bootstrap_api_key is not None
    store = KeyStore(Database(tmp_path / "engine_service.db"))

    store.seed_bootstrap(settings.bootstrap_api_key.get_secret_value())

    assert store.count_usable() == 1


def test_host_a_publishes_the_api_where_host_b_looks_for_it(setup: Setup) -> None:
    api = urlsplit(setup.b.environ["ENGINE_SERVICE_API_URL"])
    for command in _ups(setup.a):
        compose = _compose(setup.a, command)
        started = services_started(compose, command.profiles, command.services)
        (server,) = started & API_SERVICES

        assert compose["services"][server]["ports"] == [f"{api.hostname}:{api.port}:8000"]


def test_host_b_commands_start_only_remote_workers_each_on_its_own_gpu(setup: Setup) -> None:
    placements = []
    for command in _ups(setup.b):
        compose = _compose(setup.b, command)
        started = services_started(compose, command.profiles, command.services)
        devices = compose["services"]["remote-worker"]["deploy"]["resources"]["reservations"]["devices"]

        assert started == {"remote-worker"}, command.line
        placements.append((command.project, tuple(devices[0]["device_ids"])))

    projects = [project for project, _ in placements]
    gpus = [gpu for _, gpu in placements]
    assert len(set(projects)) == len(projects), "two workers in one compose project would be one container"
    assert len(set(gpus)) == len(gpus), f"two workers on one GPU: {placements}"


def test_host_b_builds_the_image_its_workers_run(setup: Setup) -> None:
    builds = [command for command in setup.b.commands if command.subcommand == "build"]
    for command in builds:
        compose = _compose(setup.b, command)
        for name in command.services:
            assert "build" in compose["services"][name], command.line
            assert compose["services"][name]["image"] == compose["services"]["remote-worker"]["image"]


def test_host_b_worker_reports_to_host_a_with_the_shared_secrets(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = setup.a.environ
    for command in _ups(setup.b):
        compose = _compose(setup.b, command)
        remote = compose["services"]["remote-worker"]
        settings = _settings(compose, "remote-worker", monkeypatch)
        url = urlsplit(settings.redis_url)

        api_url = setup.b.environ["ENGINE_SERVICE_API_URL"]
        assert remote["command"] == ["engine-service", "worker", "--api-url", api_url]
        assert urlsplit(remote["command"][-1]).hostname == a["ENGINE_PUBLISH_ADDRESS"]
        assert settings.worker_token_value() == a["ENGINE_SERVICE_WORKER_TOKEN"]
        assert (url.hostname, url.port) == (a["ENGINE_REDIS_PUBLISH_ADDRESS"], 6379)
        assert url.password == a["ENGINE_REDIS_PASSWORD"]
        assert settings.worker_cache_dir == Path("/data/worker-cache")
        assert remote["volumes"] == ["worker-cache:/data/worker-cache"]
