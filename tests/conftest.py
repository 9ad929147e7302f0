"""Shared fixtures: one real server per test session, model files from installed packages."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest

from tests.server import free_port, running_server, settings_for

# The slow tier (`pytest -m slow`; the fast inner loop is `pytest -m "not slow"`): whole-system checks
# that start extra servers or processes, fuzz, or run trained models end to end on real photos. Node
# ids under tests/: a directory, a file, or one test (all its parameters).
SLOW_PATHS = (
    "robustness/",
    "restart/",
    "deploy/",
    "remote/test_remote_worker.py",
    "backends/test_ppocr_end_to_end.py",
    "quantize/test_ppocr_end_to_end.py",
    "api/test_quantizations.py::test_trained_ppocr_classifier_on_real_photos_keeps_its_predictions",
    "quantize/test_search.py::test_default_search_keeps_a_trained_classifiers_answers_on_real_photos",
)
TESTS_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under :data:`SLOW_PATHS` ``slow``, so that ``-m "not slow"`` leaves them out."""
    for item in items:
        relative = Path(str(item.path)).resolve().relative_to(TESTS_DIR).as_posix()
        node = relative + item.nodeid.partition("::")[1] + item.nodeid.partition("::")[2]
        if node.startswith(SLOW_PATHS):
            item.add_marker(pytest.mark.slow)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {name} is not installed")
    return Path(spec.origin).parent


ONNX_ZOO_DIR = _package_dir("onnx") / "backend" / "test" / "data" / "light"


@pytest.fixture(scope="session")
def zoo_model_path() -> Callable[[str], Path]:
    """Path of a structural model-zoo graph shipped inside the onnx package (e.g. 'resnet50')."""

    def path(name: str) -> Path:
        return ONNX_ZOO_DIR / f"light_{name}.onnx"

    return path


@pytest.fixture(scope="session")
def resnet50_bytes() -> bytes:
    return (ONNX_ZOO_DIR / "light_resnet50.onnx").read_bytes()


@pytest.fixture(scope="session")
def rapidocr_models_dir() -> Path:
    """Trained PP-OCR models shipped by the rapidocr package."""
    return _package_dir("rapidocr") / "models"


@pytest.fixture(scope="session")
def server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="session")
def api(server_root: Path) -> Iterator[httpx.Client]:
    """A client for the session's shared server (real uvicorn on loopback, default settings)."""
    with running_server(settings_for(server_root)) as client:
        yield client


@pytest.fixture
def start_server(tmp_path: Path) -> Callable[..., AbstractContextManager[httpx.Client]]:
    """Start a dedicated server with overridden settings: `with start_server(max_upload_bytes=10) as c:`."""

    def start(**overrides: Any) -> AbstractContextManager[httpx.Client]:
        return running_server(settings_for(tmp_path / "server", **overrides))

    return start


def load_model(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port, without persistence, for the session.

    Tests that use it empty it first (``flushdb``). ``.ci/run`` installs Debian's redis-server.
    """
    redis = pytest.importorskip("redis", reason="the 'redis' extra (rq, redis) is not installed")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            time.sleep(0.05)
    try:
        yield url
    finally:
        client.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
