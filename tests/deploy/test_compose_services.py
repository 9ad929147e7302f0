"""What compose.yaml starts and how: GPU reservations, profiles, volumes, settings, the bootstrap key.

The two-host setup as the READMEs write it is checked in test_two_hosts.py, the Redis start script and
health check against a real redis-server in test_redis_service.py.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from service.auth.keys import KeyConfigError, KeyStore
from service.config import Settings
from service.store.db import Database
from tests.deploy.deploy_files import (
    DOCKER_DIR,
    DOCKERFILES,
    ENV_NAME,
    ENV_PREFIX,
    ProfileError,
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
LOCAL_WORKERS = ("worker", "worker-cpu")
# Services that share the API's data volumes (and so its database).
ENGINE_SERVICES = (*API_SERVICES, *LOCAL_WORKERS)
CPU_IMAGE_SERVICES = ("engine-service-cpu", "worker-cpu")
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


def _container_settings(compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The real Settings a service's container builds: image ENV first, compose environment on top."""
    image = "cpu" if name in CPU_IMAGE_SERVICES else "gpu"
    environment = {
        **read_stages(DOCKERFILES[image])[-1].environment(),
        **compose["services"][name]["environment"],
    }
    for variable in list(environment):
        if variable.startswith(ENV_PREFIX):
            monkeypatch.setenv(variable, str(environment[variable]))
    return Settings(_env_file=None)  # type: ignore[call-arg]


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


def test_cpu_only_api_host_starts_its_workers_stack_without_a_gpu(compose: dict[str, Any]) -> None:
    started = services_started(compose, targets=["engine-service-cpu", "worker-cpu"])
    worker = compose["services"]["worker-cpu"]

    assert started == {"engine-service-cpu", "worker-cpu", "redis"}
    assert not any(reserves_gpu(compose["services"][name]) for name in started)
    assert worker["command"] == ["engine-service", "worker"]
    assert worker["environment"]["ENGINE_SERVICE_QUEUE_BACKEND"] == "redis"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "build" not in worker
    assert worker["image"] == compose["services"]["engine-service-cpu"]["image"] == "engine-service:cpu"


def test_a_service_whose_dependency_no_profile_enables_is_refused(compose: dict[str, Any]) -> None:
    # The reader must refuse what Compose refuses, or the two tests above would prove nothing.
    broken = {
        "services": {**compose["services"], "redis": {**compose["services"]["redis"], "profiles": ["x"]}}
    }

    with pytest.raises(ProfileError, match="worker-cpu depends on redis"):
        services_started(broken, targets=["worker-cpu"])


def test_no_profile_starts_the_remote_worker_on_the_api_host(compose: dict[str, Any]) -> None:
    for profiles in (["workers"], ["cpu"], ["cpu-workers"], ["workers", "cpu", "cpu-workers"]):
        assert "remote-worker" not in services_started(compose, profiles=profiles)


def test_naming_the_remote_worker_starts_it_alone_on_one_gpu(compose: dict[str, Any]) -> None:
    remote = compose["services"]["remote-worker"]
    devices = remote["deploy"]["resources"]["reservations"]["devices"]

    assert services_started(compose, targets=["remote-worker"]) == {"remote-worker"}
    assert "depends_on" not in remote, "Redis runs on the API host, not beside the remote worker"
    # By index: `count: 1` would give every worker on the host GPU 0.
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    second = interpolated_compose({"ENGINE_WORKER_GPU": "1"})["services"]["remote-worker"]
    assert second["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]


def test_the_remote_worker_keeps_only_its_download_cache(compose: dict[str, Any]) -> None:
    remote = compose["services"]["remote-worker"]
    image_environment = read_stages(DOCKERFILES["gpu"])[-1].environment()
    cache_dir = image_environment["ENGINE_SERVICE_WORKER_CACHE_DIR"]

    assert remote["volumes"] == [f"worker-cache:{cache_dir}"]
    assert "worker-cache" in compose["volumes"]
    assert remote["environment"]["ENGINE_SERVICE_WORKER_CACHE_DIR"] == cache_dir
    assert not {"state", "engines", "calibration_data", "models"} & {
        entry.split(":", 1)[0] for entry in remote["volumes"]
    }


def test_the_remote_worker_is_told_its_api_and_never_gets_api_secrets(compose: dict[str, Any]) -> None:
    remote = compose["services"]["remote-worker"]
    configured = interpolated_compose(
        {
            "ENGINE_SERVICE_API_URL": "http://10.0.0.5:8000",
            "ENGINE_SERVICE_WORKER_TOKEN": "t" * 32,
            "ENGINE_SERVICE_REDIS_URL": "redis://:pw@10.0.0.5:6379/0",
        }
    )["services"]["remote-worker"]

    assert configured["command"] == ["engine-service", "worker", "--api-url", "http://10.0.0.5:8000"]
    assert configured["environment"]["ENGINE_SERVICE_WORKER_TOKEN"] == "t" * 32
    assert configured["environment"]["ENGINE_SERVICE_REDIS_URL"] == "redis://:pw@10.0.0.5:6379/0"
    assert configured["environment"]["ENGINE_SERVICE_QUEUE_BACKEND"] == "redis"
    assert "ENGINE_SERVICE_BOOTSTRAP_API_KEY" not in remote["environment"]
    # Without its variables it gets nothing that points at this host's own Redis or database.
    assert remote["environment"]["ENGINE_SERVICE_REDIS_URL"] == ""
    assert remote["command"][-2:] == ["--api-url", ""]
    assert "ENGINE_SERVICE_DATABASE_PATH" not in remote["environment"]


def test_the_remote_worker_builds_the_gpu_image_it_runs(compose: dict[str, Any]) -> None:
    services = compose["services"]

    assert services["remote-worker"]["build"] == services["engine-service"]["build"]
    assert services["remote-worker"]["image"] == services["engine-service"]["image"]


def test_the_remote_worker_gets_time_to_finish_a_build_and_no_http_check(compose: dict[str, Any]) -> None:
    remote = compose["services"]["remote-worker"]

    assert remote["stop_grace_period"] == compose["services"]["worker"]["stop_grace_period"] == "5m"
    assert remote["healthcheck"] == {"disable": True}
    assert "ports" not in remote


def test_remote_worker_settings_validate_with_the_real_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compose = interpolated_compose(
        {"ENGINE_SERVICE_WORKER_TOKEN": "w" * 40, "ENGINE_SERVICE_REDIS_URL": "redis://:pw@10.0.0.5:6379/0"}
    )

    settings = _container_settings(compose, "remote-worker", monkeypatch)

    assert settings.worker_token_value() == "w" * 40
    assert settings.queue_backend == "redis"
    assert settings.redis_url == "redis://:pw@10.0.0.5:6379/0"
    assert settings.worker_cache_dir == Path("/data/worker-cache")
    assert settings.worker_cache_bytes == Settings.model_fields["worker_cache_bytes"].default


@pytest.mark.parametrize("name", ["engine-service", "worker"])
def test_gpu_services_reserve_one_nvidia_gpu_with_the_gpu_capability(
    compose: dict[str, Any], name: str
) -> None:
    devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]

    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


@pytest.mark.parametrize("name", API_SERVICES)
def test_api_servers_seed_the_bootstrap_key_from_the_environment(compose: dict[str, Any], name: str) -> None:
    assert compose["services"][name]["environment"]["ENGINE_SERVICE_BOOTSTRAP_API_KEY"] == BOOTSTRAP_KEY


def test_compose_requires_no_variable_so_each_host_sets_only_its_own() -> None:
    # A `:?` anywhere would stop every command on every host: Compose interpolates before profiles.
    assert interpolated_compose({})["services"]


@pytest.mark.parametrize("name", API_SERVICES)
def test_without_a_bootstrap_key_the_api_server_refuses_to_start(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compose passes the unset key as an empty string; the server's own check must stop it, not seed it.
    settings = _container_settings(interpolated_compose({}), name, monkeypatch)
    assert settings.auth_enabled and settings.bootstrap_api_key is not None
    store = KeyStore(Database(tmp_path / "engine_service.db"))

    with pytest.raises(KeyConfigError, match="ENGINE_SERVICE_BOOTSTRAP_API_KEY"):
        store.seed_bootstrap(settings.bootstrap_api_key.get_secret_value())
    assert store.count_usable() == 0


@pytest.mark.parametrize("name", [*LOCAL_WORKERS, "remote-worker"])
def test_workers_never_receive_the_bootstrap_key(compose: dict[str, Any], name: str) -> None:
    assert "ENGINE_SERVICE_BOOTSTRAP_API_KEY" not in compose["services"][name]["environment"]


@pytest.mark.parametrize("name", LOCAL_WORKERS)
def test_local_workers_need_no_worker_token(compose: dict[str, Any], name: str) -> None:
    # They share the API's database; the token is for workers on other hosts.
    assert "ENGINE_SERVICE_WORKER_TOKEN" not in compose["services"][name]["environment"]


@pytest.mark.parametrize("name", API_SERVICES)
def test_api_servers_take_the_worker_token_from_the_environment(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "0123456789abcdef" * 4
    opened = interpolated_compose({"ENGINE_SERVICE_WORKER_TOKEN": token})

    assert _container_settings(opened, name, monkeypatch).worker_token_value() == token


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
        "ENGINE_REDIS_PASSWORD",
        "ENGINE_REDIS_PUBLISH_ADDRESS",
        "ENGINE_REDIS_PUBLISH_PORT",
        "ENGINE_WORKER_GPU",
    }


@pytest.mark.parametrize("name", ENGINE_SERVICES)
def test_default_environment_is_valid_for_the_real_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _container_settings(compose, name, monkeypatch)

    assert settings.worker_token_value() is None, "no remote workers unless a token is set"
    assert settings.auth_enabled is True
    assert settings.default_backend == "auto"
    assert settings.log_json is True
    assert settings.host == "0.0.0.0"
    assert settings.max_upload_bytes == Settings.model_fields["max_upload_bytes"].default
    assert settings.engine_cache_bytes == Settings.model_fields["engine_cache_bytes"].default
    assert settings.queue_backend == ("redis" if name in LOCAL_WORKERS else "embedded")
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
        "ENGINE_SERVICE_WORKER_CACHE_DIR": "/data/worker-cache",
    }

    for variable, mount in paths.items():
        assert environment[variable] == mount
    # The database's folder, not just the file, must persist: SQLite keeps -wal/-shm files beside it.
    assert str(PurePosixPath(environment["ENGINE_SERVICE_DATABASE_PATH"]).parent) == DATA_MOUNTS["state"]


def test_redis_keeps_its_queue_on_a_named_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]

    assert "redis-data:/data" in redis["volumes"]
    assert "redis-data" in compose["volumes"]
    assert "--appendonly yes" in redis["command"][-1]
    assert not reserves_gpu(redis)


def test_redis_is_published_on_loopback_unless_told_otherwise(compose: dict[str, Any]) -> None:
    assert compose["services"]["redis"]["ports"] == ["127.0.0.1:6379:6379"]
    opened = interpolated_compose(
        {"ENGINE_REDIS_PUBLISH_ADDRESS": "10.0.0.5", "ENGINE_REDIS_PUBLISH_PORT": "6380"}
    )["services"]["redis"]
    assert opened["ports"] == ["10.0.0.5:6380:6379"]
    # The start script sees the published address: it refuses a non-loopback one without a password.
    assert opened["environment"]["ENGINE_REDIS_PUBLISH_ADDRESS"] == "10.0.0.5"


def test_redis_takes_its_password_from_the_environment_without_compose_expanding_it() -> None:
    redis = interpolated_compose({"ENGINE_REDIS_PASSWORD": "p" * 32})["services"]["redis"]
    script = redis["command"][-1]

    assert redis["command"][:2] == ["sh", "-c"]
    assert redis["environment"]["ENGINE_REDIS_PASSWORD"] == "p" * 32
    # `$$` in the file: the shell reads the variable at start, the password is not written into the command.
    assert "p" * 32 not in script and '--requirepass "$password"' in script
    assert "p" * 32 not in " ".join(redis["healthcheck"]["test"])
    assert "grep -qx PONG" in redis["healthcheck"]["test"][-1]


@pytest.mark.parametrize("name", [*ENGINE_SERVICES, "remote-worker", "redis"])
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


@pytest.mark.parametrize("name", [*LOCAL_WORKERS, "remote-worker"])
def test_workers_disable_the_http_health_check(compose: dict[str, Any], name: str) -> None:
    assert compose["services"][name]["healthcheck"] == {"disable": True}


@pytest.mark.parametrize("name", [*ENGINE_SERVICES, "remote-worker"])
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
