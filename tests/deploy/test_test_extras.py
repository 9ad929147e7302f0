"""Installing the test extra never changes what the service runs with.

The README installs ``.[test]`` into the same virtual environment as the service. A test tool that caps
one of the service's own dependencies (tritonclient's ``[grpc]`` extra and its 2.70+ releases cap
protobuf below 7 and ml_dtypes at 0.5.4) would make pip downgrade the service's packages. This reads the
installed packages' metadata (no network): every requirement that a package brought in only by the test
extra puts on one of the service's own dependencies must accept the version that the service resolves to
on its own, as pinned in docker/constraints.txt (generated from the default dependencies alone).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"


def _service_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _project_requirements(extra: str | None) -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    listed = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


def _applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in (*extras, ""))


def _closure(roots: Iterable[Requirement]) -> dict[str, metadata.Distribution]:
    """Every installed distribution the requirements pull in, by canonical name."""
    found: dict[str, metadata.Distribution] = {}
    pending = list(roots)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed here
        found[name] = distribution
        for text in distribution.requires or []:
            child = Requirement(text)
            if _applies(child, requirement.extras):
                pending.append(child)
    return found


def test_test_only_packages_accept_the_versions_the_service_runs_with() -> None:
    runtime, pins = _closure(_project_requirements(None)), _service_pins()
    test_only = {
        name: dist for name, dist in _closure(_project_requirements("test")).items() if name not in runtime
    }
    conflicts: list[str] = []
    for name, distribution in sorted(test_only.items()):
        for text in distribution.requires or []:
            requirement = Requirement(text)
            pinned = pins.get(canonicalize_name(requirement.name))
            if pinned is None or not _applies(requirement, ()):
                continue
            if not requirement.specifier.contains(pinned, prereleases=True):
                conflicts.append(f"{name} {distribution.version} requires {text}, the service runs {pinned}")
    assert conflicts == [], "the test extra would downgrade the service: " + "; ".join(conflicts)


def test_the_check_sees_the_packages_that_once_capped_protobuf_and_ml_dtypes() -> None:
    runtime, pins = _closure(_project_requirements(None)), _service_pins()
    assert {"protobuf", "ml-dtypes", "onnx", "numpy"} <= set(runtime) & set(pins)
    assert "tritonclient" in _closure(_project_requirements("test"))
    # tritonclient 2.73's own caps, as they would be judged
    assert not Requirement("ml-dtypes<=0.5.4").specifier.contains(pins["ml-dtypes"])
    assert not Requirement("protobuf<7.0,>=6.30.0").specifier.contains(pins["protobuf"])
