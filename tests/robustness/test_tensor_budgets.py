"""Tensor sizes a request may make the server allocate: benchmarks and /infer inputs.

A model of a hundred bytes can declare a [1, 1, 16384, 16384] input (1 GiB of float32). Against a
server process, over real HTTP: its benchmark is refused at submission with a 400 that names the
setting and the server's peak memory does not move; at /infer an input over the one-input limit is
refused the same way; a benchmark within the limits still runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.api.serving_helpers import build_engine, upload_model, wait_for
from tests.model_factory import relu_of_shape
from tests.robustness.conftest import MemoryWatch, StartServer

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024


def test_a_benchmark_of_a_huge_declared_input_is_refused_without_allocating(
    server_process: StartServer,
) -> None:
    with server_process() as server:
        engine_id = build_engine(
            server.client, upload_model(server.client, relu_of_shape([1, 1, 16384, 16384]))
        )
        watch = MemoryWatch(server)
        response = server.client.post(f"/v1/engines/{engine_id}/benchmark", json={"batch_sizes": [1]})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "ENGINE_SERVICE_MAX_INPUT_TENSOR_BYTES" in error["message"]
        assert error["details"]["limit"] == "max_input_tensor_bytes"
        assert watch.growth_mib() < 32
        assert server.client.get("/v1/reports").json() == []


def test_a_benchmark_whose_batches_pass_the_total_is_refused(server_process: StartServer) -> None:
    with server_process(MAX_BENCHMARK_INPUT_BYTES=str(4 * MIB)) as server:
        engine_id = build_engine(server.client, upload_model(server.client, relu_of_shape(["n", 1024])))
        small = server.client.post(
            f"/v1/engines/{engine_id}/benchmark", json={"batch_sizes": [1], "iterations": 5}
        )
        assert small.status_code == 202, small.text
        assert wait_for(server.client, f"/v1/reports/{small.json()['id']}")["status"] == "succeeded"
        response = server.client.post(f"/v1/engines/{engine_id}/benchmark", json={"batch_sizes": [1, 2048]})
        assert response.status_code == 400, response.text
        assert "ENGINE_SERVICE_MAX_BENCHMARK_INPUT_BYTES" in response.json()["error"]["message"]


def test_an_infer_input_over_the_one_input_limit_is_a_400(server_process: StartServer) -> None:
    with server_process(MAX_INPUT_TENSOR_BYTES=str(MIB)) as server:
        engine_id = build_engine(server.client, upload_model(server.client, relu_of_shape(["n", 1024])))
        tensor = np.ones((512, 1024), np.float32)  # 2 MiB
        response = server.client.post(
            f"/v1/engines/{engine_id}/infer",
            content=tensor.tobytes(),
            headers={
                "content-type": "application/x-numpy",
                "x-tensor-dtype": "float32",
                "x-tensor-shape": "512,1024",
            },
        )
        assert response.status_code == 400, response.text
        assert "ENGINE_SERVICE_MAX_INPUT_TENSOR_BYTES" in response.json()["error"]["message"]
        ok = server.client.post(f"/v1/engines/{engine_id}/infer", json={"inputs": {"x": [[-1.0] * 1024]}})
        assert ok.status_code == 200, ok.text
