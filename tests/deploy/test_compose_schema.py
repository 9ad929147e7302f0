"""compose.yaml against the Compose Specification's JSON schema, and against `docker compose` if present.

The schema is compose-spec/compose-spec's schema/compose-spec.json (Apache-2.0) as shipped, with its
license, inside the check-jsonschema package (check_jsonschema/builtin_schemas/vendor/); it is read from
the installed package, so no copy lives in this repository and `check-jsonschema --builtin-schema
vendor.compose-spec` in .ci/lint-deploy checks against the very same file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from importlib.resources import files
from typing import Any

import pytest

from tests.deploy.deploy_files import COMPOSE_FILE, REPO_ROOT, interpolated_compose, load_compose

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (test extra) validates compose.yaml")
pytest.importorskip(
    "check_jsonschema",
    reason="check-jsonschema (test extra) ships the Compose Specification schema these tests use",
)

BOOTSTRAP_ENV = {"ENGINE_SERVICE_BOOTSTRAP_API_KEY": "k" * 32}


@pytest.fixture(scope="module")
def compose_validator() -> Any:
    schema_file = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _errors(validator: Any, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_file_matches_the_compose_specification(compose_validator: Any) -> None:
    assert _errors(compose_validator, load_compose()) == []


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param(BOOTSTRAP_ENV, id="defaults"),
        pytest.param(
            {
                **BOOTSTRAP_ENV,
                "ENGINE_PUBLISH_ADDRESS": "0.0.0.0",
                "ENGINE_PUBLISH_PORT": "9000",
                "ENGINE_SERVICE_QUEUE_BACKEND": "redis",
                "ENGINE_GPU_IMAGE": "registry.example.com/engine-service:gpu-1.0",
                "ENGINE_SERVICE_WORKER_TOKEN": "w" * 40,
                "ENGINE_REDIS_PASSWORD": "r" * 32,
                "ENGINE_REDIS_PUBLISH_ADDRESS": "10.0.0.5",
                "ENGINE_REDIS_PUBLISH_PORT": "6380",
            },
            id="api-host",
        ),
        pytest.param(
            {
                "ENGINE_SERVICE_API_URL": "http://10.0.0.5:8000",
                "ENGINE_SERVICE_WORKER_TOKEN": "w" * 40,
                "ENGINE_SERVICE_REDIS_URL": "redis://:pw@10.0.0.5:6379/0",
                "ENGINE_WORKER_GPU": "1",
            },
            id="worker-host",
        ),
    ],
)
def test_compose_file_matches_the_specification_after_interpolation(
    compose_validator: Any, environ: dict[str, str]
) -> None:
    assert _errors(compose_validator, interpolated_compose(environ)) == []


def test_schema_rejects_a_misspelled_gpu_reservation(compose_validator: Any) -> None:
    # The same check must fail on a broken file, or a pass above would prove nothing.
    document = copy.deepcopy(load_compose())
    resources = document["services"]["engine-service"]["deploy"]["resources"]
    resources["reservation"] = resources.pop("reservations")

    errors = _errors(compose_validator, document)

    assert any("reservation" in error for error in errors), errors


def test_schema_rejects_an_unknown_service_key(compose_validator: Any) -> None:
    document = copy.deepcopy(load_compose())
    document["services"]["worker"]["healthchek"] = {"disable": True}

    errors = _errors(compose_validator, document)

    assert any("healthchek" in error for error in errors), errors


def _docker_compose_available() -> str | None:
    """None when `docker compose` runs here, else why not."""
    docker = shutil.which("docker")
    if docker is None:
        return "the docker CLI is not installed"
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return "the docker CLI has no compose plugin (`docker compose version` failed)"
    return None


@pytest.mark.parametrize(
    "profiles",
    [
        pytest.param((), id="default"),
        pytest.param(("cpu", "workers", "cpu-workers", "remote-worker"), id="all-profiles"),
    ],
)
def test_docker_compose_config_accepts_the_file(profiles: tuple[str, ...]) -> None:
    # `docker compose config` parses, interpolates and validates offline; it needs no daemon.
    missing = _docker_compose_available()
    if missing is not None:
        pytest.skip(f"docker compose config not run: {missing}")
    command = ["docker", "compose", "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        command += ["--profile", profile]
    result = subprocess.run(
        [*command, "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **BOOTSTRAP_ENV},
    )
    assert result.returncode == 0, result.stderr
