"""Fixtures for the CLI tests: invoke `engine-service` in-process against the session's real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from service.cli.main import app
from tests.model_factory import model_bytes, resnet_block_classifier

# Seeds of the CLI tests' own models, so content-addressed ids never collide with other test modules.
CLASSIFIER = resnet_block_classifier(seed=1001)

Cli = Callable[..., Result]


def invoke(*args: str, input: str | None = None) -> Result:
    """Run `engine-service ARGS` in-process; real exceptions propagate instead of being swallowed."""
    return CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)


def json_of(result: Result) -> Any:
    """The JSON document a --json command printed on stdout (nothing else may be there)."""
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return json.loads(result.stdout)


def errors_of(result: Result) -> list[str]:
    """The CLI's "error: ..." lines on stderr (the in-process test server may log there too)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="session")
def base_url(api: httpx.Client) -> str:
    return str(api.base_url).rstrip("/")


def _bound(base_url: str) -> Cli:
    def run(*args: str, input: str | None = None) -> Result:
        return invoke(*args, "--url", base_url, input=input)

    return run


@pytest.fixture
def cli(base_url: str) -> Cli:
    """`engine-service ARGS --url <session server>`."""
    return _bound(base_url)


@pytest.fixture(scope="module")
def cli_module(base_url: str) -> Cli:
    """The same, for module-scoped fixtures."""
    return _bound(base_url)


@pytest.fixture(scope="session")
def classifier_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-models") / "classifier.onnx"
    path.write_bytes(model_bytes(CLASSIFIER))
    return path


@pytest.fixture(scope="session")
def classifier_id(base_url: str, classifier_file: Path) -> str:
    result = invoke("models", "upload", str(classifier_file), "--json", "--url", base_url)
    return str(json_of(result)["id"])


@pytest.fixture(scope="session")
def fp32_build(base_url: str, classifier_id: str) -> Result:
    """The CLI's own fp32 onnxruntime build of the classifier (its output is checked in a test)."""
    return invoke(
        "build", classifier_id, "--precision", "fp32", "--backend", "onnxruntime", "--url", base_url
    )


@pytest.fixture(scope="session")
def fp32_engine_id(base_url: str, classifier_id: str, fp32_build: Result) -> str:
    assert fp32_build.exit_code == 0, fp32_build.output
    listed = json_of(invoke("engines", "list", "--model", classifier_id, "--json", "--url", base_url))
    (engine,) = [e for e in listed if e["precision"] == "fp32" and e["backend"] == "onnxruntime"]
    return str(engine["id"])
