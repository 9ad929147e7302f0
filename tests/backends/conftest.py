"""Fixtures shared by the backend tests: models, ONNX Runtime references and memoised builds.

TensorRT-RTX builds cost 0.1-3 s and ~300 MB each, so every build a test needs goes through the
session-wide ``builds`` cache: the conformance suite and the backend-specific tests share them, and
the whole backend test set runs only a handful of real builds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.backends.base import Backend, BuildSpec, BuiltEngine
from service.backends.registry import get_backend
from tests import model_factory


@dataclass
class BuildCache:
    """Builds keyed by (backend name, label); a failed build is re-raised, never retried."""

    _built: dict[tuple[str, str], BuiltEngine] = field(default_factory=dict)

    def get(self, backend: Backend, label: str, model: onnx.ModelProto, spec: BuildSpec) -> BuiltEngine:
        key = (backend.name, label)
        if key not in self._built:
            self._built[key] = backend.build(model_factory.model_bytes(model), spec)
        return self._built[key]


@pytest.fixture(scope="session")
def builds() -> BuildCache:
    return BuildCache()


@pytest.fixture(scope="session")
def resnet_block() -> onnx.ModelProto:
    """The dynamic-batch ResNet-style classifier of tests/model_factory.py."""
    return model_factory.resnet_block_classifier()


@pytest.fixture(scope="session")
def rtx_backend() -> Backend:
    backend = get_backend("tensorrt-rtx")
    availability = backend.available()
    if not availability.can_build:
        pytest.skip(f"tensorrt-rtx: {availability.reason}")
    return backend


@pytest.fixture(scope="session")
def image_batch() -> Callable[[int, int], np.ndarray]:
    """Seeded NCHW float32 inputs for the 3-channel test models."""

    def make(batch: int = 2, size: int = 16) -> np.ndarray:
        return (
            np.random.default_rng(batch * 1000 + size)
            .standard_normal((batch, 3, size, size))
            .astype(np.float32)
        )

    return make


def reference_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of an unmodified ONNX Runtime CPU session on the model as given."""
    session = ort.InferenceSession(model_factory.model_bytes(model), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def op_types(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> op type."""
    return {node.name: node.op_type for node in model.graph.node}
