"""The package's dependency graph points one way: no import cycles, HTTP stays in ``service/api``.

The graph is read from the source with :mod:`ast`, counting every import: module level, inside
functions and under ``TYPE_CHECKING`` alike (a function-level import is still a dependency, only a
later one). ``from . import x`` is resolved to the module ``x`` when ``x`` is one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "service"
HTTP_LAYER = ("service.api", "service.app")
HTTP_LIBRARIES = ("fastapi", "starlette")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports, relative imports made absolute, ``from m import x`` as m.x too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


@cache
def _graph() -> tuple[Mapping[str, frozenset[str]], Mapping[str, frozenset[str]]]:
    """(module -> service modules it imports, module -> every top-level name it imports)."""
    paths = {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    internal: dict[str, frozenset[str]] = {}
    external: dict[str, frozenset[str]] = {}
    for module, path in paths.items():
        imported = _imported_names(path, module)
        targets: set[str] = set()
        for name in imported:
            # `from service.x import Thing` names service.x.Thing: walk up to the module that exists.
            while name not in paths and "." in name:
                name = name.rpartition(".")[0]
            if name in paths and name != module:
                targets.add(name)
        internal[module] = frozenset(targets)
        external[module] = frozenset(name.partition(".")[0] for name in imported)
    return internal, external


def _cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _unit(module: str) -> str:
    """The top-level unit of service/ a module belongs to: service.catalog.engines -> service.catalog."""
    return ".".join(module.split(".")[:2])


def _in_http_layer(module: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in HTTP_LAYER)


def test_the_graph_reader_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "service" / "pkg" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from . import sibling\n    import service.other.thing\n")
    names = _imported_names(source, "service.pkg.mod")
    assert {"service.pkg.sibling", "service.other.thing"} <= names


def test_the_cycle_finder_finds_a_cycle_and_only_that_one() -> None:
    edges = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_the_package_graph_is_read_whole() -> None:
    internal, _ = _graph()
    assert len(internal) > 100, "the graph reader found too few modules of service/"
    assert "service.app" in internal["service.cli.main"] or any(
        "service.app" in targets for module, targets in internal.items() if module.startswith("service.cli")
    )


def test_no_import_cycle_between_modules() -> None:
    internal, _ = _graph()
    assert _cycles(internal) == []


def test_no_import_cycle_between_top_level_packages() -> None:
    internal, _ = _graph()
    units: dict[str, set[str]] = {}
    for module, targets in internal.items():
        source = _unit(module)
        units.setdefault(source, set()).update(
            _unit(target) for target in targets if _unit(target) != source and _unit(target) != "service"
        )
    assert _cycles(units) == []


def test_nothing_outside_the_http_layer_imports_the_api_package() -> None:
    internal, _ = _graph()
    offenders = {
        module: sorted(target for target in targets if _in_http_layer(target))
        for module, targets in internal.items()
        if not _in_http_layer(module) and not module.startswith("service.cli")
    }
    # The CLI starts the app (service.app) to serve; it still never reaches into service.api.
    offenders.update(
        {
            module: sorted(target for target in targets if target.startswith("service.api"))
            for module, targets in internal.items()
            if module.startswith("service.cli")
        }
    )
    assert {module: targets for module, targets in offenders.items() if targets} == {}


@pytest.mark.parametrize("library", HTTP_LIBRARIES)
def test_nothing_below_the_http_layer_imports_the_web_framework(library: str) -> None:
    _, external = _graph()
    users = sorted(
        module for module, names in external.items() if library in names and not _in_http_layer(module)
    )
    assert users == []
