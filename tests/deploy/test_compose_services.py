"""What compose.yaml starts and how: GPU reservations, profiles, volumes, settings, the bootstrap key."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import pytest

from service.config import Settings
from tests.deploy.deploy_files import (
    DOCKER_DIR,
    DOCKERFILES,
    ENV_NAME,
    ENV_PREFIX,
    InterpolationError,
    interpolated_compose,
    load_compose,
    read_stages,
    referenced_variables,
    reserves_gpu,
    services_started,
    settings_env_names,
)

BOOTSTRAP_KEY = "bootstrap-" + "0123456789abcdef" * 2
API_SERVICES = ("engine-service", "engine-service-cpu")
ENGINE_SERVICES = (*API_SERVICES, "worker")
# Where each named volume must be mounted: the images put the database in /data and the three data
# roots below it (ENGINE_SERVICE_*_DIR / _DATABASE_PATH in docker/Dockerfile.*).
DATA_MOUNTS = {
    "state": "/data",
    "engines": "/data/engines",
    "calibration_data": "/data/calibration_data",
    "models": "/data/models",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolated_compose({"ENGINE_SERVICE_BOOTSTRAP_API_KEY": BOOTSTRAP_KEY})


def test_plain_up_starts_only_the_gpu_api_server(compose: dict[str, Any]) -> None:
    assert services_started(compose) == {"engine-service"}
    assert reserves_gpu(compose["services"]["engine-service"])


def test_documented_cpu_command_starts_nothing_that_needs_a_gpu(compose: dict[str, Any]) -> None:
    started = services_started(compose, profiles=["cpu"], targets=["engine-service-cpu"])

    assert started == {"engine-service-cpu"}
    assert not any(reserves_gpu(compose["services"][name]) for name in started)


def test_cpu_profile_alone_would_also_start_the_gpu_server(compose: dict[str, Any]) -> None:
    # The reason the README's CPU command names its service; if this ever changes, simplify the docs.
    assert services_started(compose, profiles=["cpu"]) == {"engine-service", "engine-service-cpu"}


def test_workers_profile_adds_redis_and_a_gpu_build_worker(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert services_started(compose, profiles=["workers"]) == {"engine-service", "redis", "worker"}
    assert services_started(compose, targets=["worker"]) == {"worker", "redis"}
    assert services["worker"]["command"] == ["engine-service", "worker"]
    assert services["worker"]["environment"]["ENGINE_SERVICE_QUEUE_BACKEND"] == "redis"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert reserves_gpu(services["worker"])
    assert not reserves_gpu(services["redis"])


@pytest.mark.parametrize("name", ["engine-service", "worker"])
def test_gpu_services_reserve_one_nvidia_gpu_with_the_gpu_capability(
    compose: dict[str, Any], name: str
) -> None:
    devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]

    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


@pytest.mark.parametrize("name", API_SERVICES)
def test_api_servers_seed_the_bootstrap_key_from_the_environment(compose: dict[str, Any], name: str) -> None:
    assert compose["services"][name]["environment"]["ENGINE_SERVICE_BOOTSTRAP_API_KEY"] == BOOTSTRAP_KEY


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_compose_refuses_to_start_without_a_bootstrap_key(value: str | None) -> None:
    environ = {} if value is None else {"ENGINE_SERVICE_BOOTSTRAP_API_KEY": value}

    with pytest.raises(InterpolationError, match=r"ENGINE_SERVICE_BOOTSTRAP_API_KEY.*at least 20 characters"):
        interpolated_compose(environ)


def test_workers_never_receive_the_bootstrap_key(compose: dict[str, Any]) -> None:
    assert "ENGINE_SERVICE_BOOTSTRAP_API_KEY" not in compose["services"]["worker"]["environment"]


def test_every_engine_service_variable_is_a_setting_the_service_reads() -> None:
    known = settings_env_names()
    raw = load_compose()
    used = {name for name in referenced_variables(raw) if name.startswith(ENV_PREFIX)}
    for service in raw["services"].values():
        used |= {name for name in service.get("environment", {}) if name.startswith(ENV_PREFIX)}
    for path in [*DOCKERFILES.values(), DOCKER_DIR / "README.md", DOCKER_DIR / "healthcheck.py"]:
        used |= set(ENV_NAME.findall(path.read_text(encoding="utf-8")))

    assert used, "no ENGINE_SERVICE_ variables found: the reader is broken"
    assert used - known == set(), f"not fields of service.config.Settings: {sorted(used - known)}"


def test_other_variables_do_not_borrow_the_settings_prefix() -> None:
    # Compose-only knobs (published address and port, image names) must not look like service settings.
    foreign = {name for name in referenced_variables(load_compose()) if not name.startswith(ENV_PREFIX)}

    assert foreign == {
        "ENGINE_PUBLISH_ADDRESS",
        "ENGINE_PUBLISH_PORT",
        "ENGINE_GPU_IMAGE",
        "ENGINE_CPU_IMAGE",
    }


@pytest.mark.parametrize("name", ENGINE_SERVICES)
def test_default_environment_is_valid_for_the_real_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each service's settings as the container sees them: image ENV first, compose environment on top.
    image = "cpu" if name == "engine-service-cpu" else "gpu"
    environment = {
        **read_stages(DOCKERFILES[image])[-1].environment(),
        **compose["services"][name]["environment"],
    }
    for variable in list(environment):
        if variable.startswith(ENV_PREFIX):
            monkeypatch.setenv(variable, str(environment[variable]))

    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.auth_enabled is True
    assert settings.default_backend == "auto"
    assert settings.log_json is True
    assert settings.host == "0.0.0.0"
    assert settings.max_upload_bytes == Settings.model_fields["max_upload_bytes"].default
    assert settings.engine_cache_bytes == Settings.model_fields["engine_cache_bytes"].default
    assert settings.queue_backend == ("redis" if name == "worker" else "embedded")
    assert settings.redis_url == "redis://redis:6379/0"


@pytest.mark.parametrize("name", ENGINE_SERVICES)
def test_engine_services_mount_every_data_root_on_a_named_volume(compose: dict[str, Any], name: str) -> None:
    mounts = dict(reversed(entry.split(":", 1)) for entry in compose["services"][name]["volumes"])

    assert mounts == {target: source for source, target in DATA_MOUNTS.items()}
    assert set(DATA_MOUNTS) <= set(compose["volumes"])


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_the_images_data_paths_lie_on_the_mounted_volumes(image: str) -> None:
    environment = read_stages(DOCKERFILES[image])[-1].environment()
    paths = {
        "ENGINE_SERVICE_ENGINES_DIR": "/data/engines",
        "ENGINE_SERVICE_CALIBRATION_DIR": "/data/calibration_data",
        "ENGINE_SERVICE_MODELS_DIR": "/data/models",
    }

    for variable, mount in paths.items():
        assert environment[variable] == mount
    # The database's folder, not just the file, must persist: SQLite keeps -wal/-shm files beside it.
    assert str(PurePosixPath(environment["ENGINE_SERVICE_DATABASE_PATH"]).parent) == DATA_MOUNTS["state"]


def test_redis_keeps_its_queue_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]

    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]
    assert "--appendonly" in redis["command"]
    assert "ports" not in redis, "the queue must not be published outside the compose network"


@pytest.mark.parametrize("name", [*ENGINE_SERVICES, "redis"])
def test_every_service_restarts_unless_stopped(compose: dict[str, Any], name: str) -> None:
    assert compose["services"][name]["restart"] == "unless-stopped"


@pytest.mark.parametrize("name", API_SERVICES)
def test_api_servers_check_health_with_the_script_the_images_install(
    compose: dict[str, Any], name: str
) -> None:
    check = compose["services"][name]["healthcheck"]
    image = "cpu" if name == "engine-service-cpu" else "gpu"
    copies = [item.arguments for item in read_stages(DOCKERFILES[image])[-1].all("COPY")]

    assert check["test"][:2] == ["CMD", "python"]
    assert f"docker/healthcheck.py {check['test'][2]}" in copies
    assert check["start_period"] and check["interval"] and check["retries"] >= 1


def test_the_worker_disables_the_http_health_check(compose: dict[str, Any]) -> None:
    assert compose["services"]["worker"]["healthcheck"] == {"disable": True}


@pytest.mark.parametrize("name", ENGINE_SERVICES)
def test_engine_services_drop_privileges_and_run_an_init(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]

    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert service["init"] is True


@pytest.mark.parametrize("name", API_SERVICES)
def test_api_servers_publish_on_loopback_unless_told_otherwise(compose: dict[str, Any], name: str) -> None:
    assert compose["services"][name]["ports"] == ["127.0.0.1:8000:8000"]
    opened = interpolated_compose(
        {"ENGINE_SERVICE_BOOTSTRAP_API_KEY": BOOTSTRAP_KEY, "ENGINE_PUBLISH_ADDRESS": "0.0.0.0"},
    )
    assert opened["services"][name]["ports"] == ["0.0.0.0:8000:8000"]


@pytest.mark.parametrize(
    ("name", "dockerfile"),
    [("engine-service", "docker/Dockerfile.gpu"), ("engine-service-cpu", "docker/Dockerfile.cpu")],
)
def test_each_api_server_builds_its_own_image(compose: dict[str, Any], name: str, dockerfile: str) -> None:
    assert compose["services"][name]["build"] == {"context": ".", "dockerfile": dockerfile}


def test_the_worker_reuses_the_gpu_image_instead_of_building_it_again(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert "build" not in services["worker"]
    assert services["worker"]["image"] == services["engine-service"]["image"] == "engine-service:gpu"
