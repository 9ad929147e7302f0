"""Readers for the deployment files: compose.yaml as Compose reads it, and Dockerfiles as instructions.

Docker and its compose plugin are not needed (nor usually present) where the tests run, so this module
reproduces the two parts of Compose's behaviour the tests reason about, following the Compose
Specification:

- interpolation: ``$$``, ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``,
  ``${NAME:?message}``, ``${NAME?message}``, ``${NAME:+alternative}``, ``${NAME+alternative}``, applied to
  every string value (never to keys), before profiles are considered;
- which services ``docker compose [--profile P] up [SERVICE...]`` starts: with no service named, every
  service without ``profiles`` plus those in an active profile; with services named, exactly those (their
  profiles are enabled implicitly); then everything they ``depends_on``, transitively.

The Dockerfile reader joins continuation lines, drops comment lines, and splits the file into stages.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILES = {"gpu": DOCKER_DIR / "Dockerfile.gpu", "cpu": DOCKER_DIR / "Dockerfile.cpu"}
CONSTRAINTS_FILE = DOCKER_DIR / "constraints.txt"
HADOLINT_CONFIG = REPO_ROOT / ".hadolint.yaml"

ENV_PREFIX = "ENGINE_SERVICE_"
ENV_NAME = re.compile(r"\bENGINE_SERVICE_[A-Z0-9_]+")

_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:-|-|:\?|\?|:\+|\+)(?P<argument>.*))?", re.S
)


class InterpolationError(ValueError):
    """Compose would refuse the file with this message (a required variable is unset)."""


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as YAML, anchors and merge keys resolved, before interpolation."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return document


def interpolate_text(text: str, environ: Mapping[str, str]) -> str:
    """One string with every variable reference replaced the way Compose replaces it."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return environ.get(match.group("named"), "")
        return _resolve_braced(match.group("braced"), environ)

    return _REFERENCE.sub(replace, text)


def _resolve_braced(body: str, environ: Mapping[str, str]) -> str:
    if "${" in body:
        raise ValueError(f"nested interpolation in '${{{body}}}' is not supported by this reader")
    parsed = _BRACED.fullmatch(body)
    if parsed is None:
        raise ValueError(f"invalid interpolation '${{{body}}}'")
    name, operator, argument = parsed.group("name", "operator", "argument")
    value = environ.get(name)
    empty = not value
    if operator is None:
        return value or ""
    if operator == ":-":
        return argument if empty else str(value)
    if operator == "-":
        return argument if value is None else value
    if operator == ":?":
        if empty:
            raise InterpolationError(f"required variable {name} is missing a value: {argument}")
        return str(value)
    if operator == "?":
        if value is None:
            raise InterpolationError(f"required variable {name} is missing a value: {argument}")
        return value
    if operator == ":+":
        return "" if empty else argument
    return "" if value is None else argument  # "+"


def interpolate(node: Any, environ: Mapping[str, str]) -> Any:
    """A copy of a loaded compose document (or any part of it) with every string value interpolated."""
    if isinstance(node, str):
        return interpolate_text(node, environ)
    if isinstance(node, list):
        return [interpolate(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, environ) for key, value in node.items()}
    return node


def interpolated_compose(environ: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as Compose sees it once ``environ`` is applied (InterpolationError if it refuses)."""
    document: dict[str, Any] = interpolate(load_compose(path), environ)
    return document


def referenced_variables(node: Any) -> set[str]:
    """Names of every variable a compose document (or part of it) reads from the environment."""
    found: set[str] = set()
    if isinstance(node, str):
        for match in _REFERENCE.finditer(node):
            if match.group("named"):
                found.add(match.group("named"))
            elif match.group("braced") is not None:
                parsed = _BRACED.fullmatch(match.group("braced"))
                if parsed is not None:
                    found.add(parsed.group("name"))
    elif isinstance(node, list):
        for item in node:
            found |= referenced_variables(item)
    elif isinstance(node, dict):
        for value in node.values():
            found |= referenced_variables(value)
    return found


def services_started(
    document: Mapping[str, Any], profiles: Iterable[str] = (), targets: Iterable[str] = ()
) -> set[str]:
    """The services `docker compose --profile P... up [TARGET...]` would start."""
    services: Mapping[str, Any] = document["services"]
    active = set(profiles)
    named = set(targets)
    unknown = named - set(services)
    if unknown:
        raise KeyError(f"no such services: {sorted(unknown)}")
    if named:
        selected = set(named)
    else:
        selected = {
            name
            for name, service in services.items()
            if not service.get("profiles") or active & set(service["profiles"])
        }
    pending = list(selected)
    while pending:
        dependencies = services[pending.pop()].get("depends_on", {})
        for dependency in dependencies if isinstance(dependencies, list) else dependencies.keys():
            if dependency not in selected:
                selected.add(dependency)
                pending.append(dependency)
    return selected


def reserves_gpu(service: Mapping[str, Any]) -> bool:
    """Whether a service asks Docker for an NVIDIA GPU (and so fails on a host without one)."""
    reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return any(
        device.get("driver") == "nvidia" or "gpu" in device.get("capabilities", [])
        for device in reservations.get("devices", [])
    )


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: its keyword (upper case), its arguments as written, its first line."""

    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD/VOLUME, else None."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            _, _, text = text.partition(" CMD ")
        text = text.strip()
        if not text.startswith("["):
            return None
        parsed = json.loads(text)
        if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
            return None
        return parsed

    def env_pairs(self) -> dict[str, str]:
        """The variables an ENV instruction sets (``KEY=value`` form)."""
        pairs = {}
        for token in shlex.split(self.arguments):
            key, equals, value = token.partition("=")
            if not equals:
                raise ValueError(f"line {self.line}: ENV without '=' is not used in this project")
            pairs[key] = value
        return pairs


@dataclass(frozen=True)
class Stage:
    """One build stage: the image it starts from, its name, and its instructions after FROM."""

    base: str
    name: str | None
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]

    def environment(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for instruction in self.all("ENV"):
            merged.update(instruction.env_pairs())
        return merged


def read_instructions(path: Path) -> list[Instruction]:
    """Every instruction of a Dockerfile, continuation lines joined and comment lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(part for part in pending if part).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    if pending:
        raise ValueError(f"{path}: the file ends inside a continued instruction")
    return instructions


def read_stages(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile, in order."""
    stages: list[Stage] = []
    current: tuple[str, str | None] | None = None
    body: list[Instruction] = []
    for instruction in read_instructions(path):
        if instruction.keyword == "FROM":
            if current is not None:
                stages.append(Stage(current[0], current[1], tuple(body)))
            words = instruction.arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            current, body = (words[0], name), []
        elif current is None:
            if instruction.keyword != "ARG":
                raise ValueError(f"{path}:{instruction.line}: {instruction.keyword} before the first FROM")
        else:
            body.append(instruction)
    if current is None:
        raise ValueError(f"{path} has no FROM")
    stages.append(Stage(current[0], current[1], tuple(body)))
    return stages


def settings_env_names() -> set[str]:
    """Every ENGINE_SERVICE_ variable the service reads: one per field of its Settings."""
    from service.config import Settings

    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}
