"""Models before ONNX IR 4 list their weights as graph inputs; they serve with their real inputs only.

onnx's light_shufflenet (IR 3) lists 282 graph inputs, 281 of them initializers. Over real HTTP:
the model record names one input, its ONNX Runtime engine runs with that one input fed (never
asking for the weights), and the engine gives the same outputs as ONNX Runtime on the original.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest

from tests.api.serving_helpers import build_engine

pytestmark = pytest.mark.timeout(180)


def test_an_ir3_model_serves_with_its_one_real_input(
    api: httpx.Client, zoo_model_path: Callable[[str], Path]
) -> None:
    data = zoo_model_path("shufflenet").read_bytes()
    original = onnx.load_from_string(data)
    initializers = {tensor.name for tensor in original.graph.initializer}
    assert original.ir_version < 4 and sum(v.name in initializers for v in original.graph.input) > 200

    uploaded = api.post("/v1/models", files={"file": ("shufflenet.onnx", data)})
    assert uploaded.status_code in (200, 201), uploaded.text
    inputs = uploaded.json()["inputs"]
    assert [spec["name"] for spec in inputs] == ["gpu_0/data_0"]

    engine_id = build_engine(api, uploaded.json()["id"])
    plan = onnx.load_from_string(api.get(f"/v1/engines/{engine_id}/plan").content)
    assert [value.name for value in plan.graph.input] == ["gpu_0/data_0"]

    image = np.random.default_rng(3).random((1, 3, 224, 224), dtype=np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **{"gpu_0/data_0": image})
    response = api.post(
        f"/v1/engines/{engine_id}/infer",
        content=buffer.getvalue(),
        headers={"content-type": "application/x-npz"},
    )
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as outputs:
        (served,) = [outputs[name] for name in outputs.files]
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"gpu_0/data_0": image})
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)
