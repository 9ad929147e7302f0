"""Readers for the deployment files: compose.yaml as Compose reads it, and Dockerfiles as instructions.

Docker and its compose plugin are not needed (nor usually present) where the tests run, so this module
reproduces the two parts of Compose's behaviour the tests reason about, following the Compose
Specification:

- interpolation: ``$$``, ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``,
  ``${NAME:?message}``, ``${NAME?message}``, ``${NAME:+alternative}``, ``${NAME+alternative}``, applied to
  every string value (never to keys), before profiles are considered;
- which services ``docker compose [--profile P] up [SERVICE...]`` starts: with no service named, every
  service without ``profiles`` plus those in an active profile; with services named, exactly those (their
  profiles are enabled implicitly); then everything they ``depends_on``, transitively, each of which must
  itself be enabled (no profiles, or one that is active), or Compose refuses the command.

The Dockerfile reader joins continuation lines, drops comment lines, and splits the file into stages.
The documentation reader finds the shell blocks that set up each host of the two-host layout (a fenced
block whose first line is ``# host A...`` or ``# host B...``) and the ``docker compose`` commands in them.
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


class ProfileError(ValueError):
    """Compose would refuse the command: a started service depends on one that no active profile enables."""


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
    for name in named:
        active |= set(services[name].get("profiles", []))

    def enabled(name: str) -> bool:
        listed = services[name].get("profiles")
        return not listed or bool(active & set(listed))

    selected = set(named) if named else {name for name in services if enabled(name)}
    pending = list(selected)
    while pending:
        name = pending.pop()
        dependencies = services[name].get("depends_on", {})
        for dependency in dependencies if isinstance(dependencies, list) else dependencies.keys():
            if not enabled(dependency):
                raise ProfileError(
                    f"{name} depends on {dependency}, whose profiles {services[dependency]['profiles']} "
                    f"are not active (active: {sorted(active)})"
                )
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


@dataclass(frozen=True)
class ComposeCommand:
    """One ``docker compose`` command line from the documentation."""

    line: str
    environ: Mapping[str, str]  # NAME=value assignments written before `docker compose`
    profiles: tuple[str, ...]
    project: str | None
    subcommand: str
    services: tuple[str, ...]


_FENCED_BLOCK = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.S)
# Options of `docker compose` and of its `up`/`build` subcommands that take a value.
_GLOBAL_VALUE_OPTIONS = {"--profile", "-p", "--project-name", "-f", "--file", "--env-file"}
_VALUE_OPTIONS = {"--scale", "--timeout", "-t", "--wait-timeout", "--pull"}


def host_blocks(path: Path, host: str) -> list[str]:
    """The fenced code blocks of a Markdown file that set up ``host`` (first line ``# host <host>...``)."""
    marker = f"# host {host}"
    blocks = [match.group(1) for match in _FENCED_BLOCK.finditer(path.read_text(encoding="utf-8"))]
    return [block for block in blocks if block.lstrip().startswith(marker)]


def compose_commands(block: str) -> list[ComposeCommand]:
    """Every ``[NAME=value ...] docker compose ...`` line of a shell block, parsed (comments dropped)."""
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        environ: dict[str, str] = {}
        while words and _ASSIGNMENT.fullmatch(words[0]):
            name, _, value = words.pop(0).partition("=")
            environ[name] = value
        if words[:2] != ["docker", "compose"]:
            continue
        words = words[2:]
        profiles: list[str] = []
        project: str | None = None
        while words and words[0].startswith("-"):
            option = words.pop(0)
            if option in _GLOBAL_VALUE_OPTIONS:
                value = words.pop(0)
                if option == "--profile":
                    profiles.append(value)
                elif option in {"-p", "--project-name"}:
                    project = value
        subcommand, *arguments = words
        services: list[str] = []
        while arguments:
            argument = arguments.pop(0)
            if argument in _VALUE_OPTIONS:
                arguments.pop(0)
            elif not argument.startswith("-"):
                services.append(argument)
                if subcommand in {"exec", "run", "logs"}:
                    break  # the rest is the command run in the container, or log options
        commands.append(
            ComposeCommand(line.strip(), environ, tuple(profiles), project, subcommand, tuple(services))
        )
    return commands


def shell_lines(block: str) -> str:
    """A shell block without its ``docker`` commands: what can run on a machine without Docker."""
    kept = []
    for line in block.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError:  # not a whole command (an unbalanced quote inside a here-document)
            words = []
        while words and _ASSIGNMENT.fullmatch(words[0]):
            words.pop(0)
        if words[:1] not in (["docker"], ["scp"]):
            kept.append(line)
    return "\n".join(kept) + "\n"


def read_env_file(path: Path) -> dict[str, str]:
    """A ``.env`` file of plain ``NAME=value`` lines, as Compose reads it (comments and blanks skipped)."""
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        name, equals, value = stripped.partition("=")
        if not equals:
            raise ValueError(f"{path}: not a NAME=value line: {line!r}")
        values[name.strip()] = value.strip()
    return values
