"""Many large request bodies at once: the server holds at most its body budget, and says so.

Sixteen clients post 8 MiB npz bodies to /infer at the same moment, each sent slowly so they all
overlap, against a server whose ENGINE_SERVICE_MAX_INFLIGHT_BODY_BYTES admits two of them (each
held at twice its size: the body and its decoded tensor). Those that find no room within
ENGINE_SERVICE_INFLIGHT_BODY_WAIT_S get 429 with Retry-After and a message naming the setting;
the others are served; nobody gets a 5xx, and the server's peak memory stays near what the budget
admits rather than what sixteen bodies would cost. JSON bodies of other routes are capped before
they are parsed.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.api.serving_helpers import build_engine, upload_model
from tests.model_factory import relu_of_shape
from tests.robustness.conftest import MemoryWatch, StartServer

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
CLIENTS = 16
ROWS = 2048  # x 1024 float32 = 8 MiB per body


def npz_body() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.full((ROWS, 1024), 0.5, np.float32))
    return buffer.getvalue()


def slowly(data: bytes, chunks: int = 20, pause_s: float = 0.05) -> Iterator[bytes]:
    """The body in pieces with pauses, so that the requests overlap on the server."""
    step = len(data) // chunks + 1
    for start in range(0, len(data), step):
        yield data[start : start + step]
        time.sleep(pause_s)


def test_concurrent_large_bodies_stay_within_the_budget(server_process: StartServer) -> None:
    body = npz_body()
    budget = 2 * 2 * len(body) + MIB  # two requests, each held at twice its bytes
    with server_process(MAX_INFLIGHT_BODY_BYTES=str(budget), INFLIGHT_BODY_WAIT_S="0.3") as server:
        engine_id = build_engine(server.client, upload_model(server.client, relu_of_shape(["n", 1024])))
        warm = server.client.post(  # the runner is loaded before the memory watch starts
            f"/v1/engines/{engine_id}/infer", content=body, headers={"content-type": "application/x-npz"}
        )
        assert warm.status_code == 200, warm.text
        watch = MemoryWatch(server)
        barrier = threading.Barrier(CLIENTS)
        base_url = str(server.client.base_url)

        def infer(_: int) -> httpx.Response:
            with httpx.Client(base_url=base_url, timeout=120) as client:
                barrier.wait()
                return client.post(
                    f"/v1/engines/{engine_id}/infer",
                    content=slowly(body),
                    headers={"content-type": "application/x-npz", "content-length": str(len(body))},
                )

        with ThreadPoolExecutor(CLIENTS) as pool:
            responses = list(pool.map(infer, range(CLIENTS)))
        statuses = [response.status_code for response in responses]
        assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code not in (200, 429)]
        busy = [response for response in responses if response.status_code == 429]
        assert busy and statuses.count(200) >= 2, statuses
        for response in busy:
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert (
                error["code"] == "server_busy"
                and "ENGINE_SERVICE_MAX_INFLIGHT_BODY_BYTES" in error["message"]
            )
        # Sixteen bodies held at once would be 16 x (8 MiB body + 8 MiB tensor + 8 MiB output) = 384 MiB.
        assert watch.growth_mib() < 120, watch.growth_mib()
        again = server.client.post(
            f"/v1/engines/{engine_id}/infer", content=body, headers={"content-type": "application/x-npz"}
        )
        assert again.status_code == 200  # every lease was given back


def test_a_json_body_past_its_cap_is_refused_before_parsing(server_process: StartServer) -> None:
    with server_process(MAX_JSON_BODY_BYTES=str(MIB)) as server:
        watch = MemoryWatch(server)
        huge = b'{"model_id": "' + b"a" * (64 * MIB) + b'", "precision": "fp32"}'
        response = server.client.post(
            "/v1/builds", content=huge, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert "ENGINE_SERVICE_MAX_JSON_BODY_BYTES" in error["message"]
        assert error["details"] == {"limit": "max_json_body_bytes", "max": MIB}

        def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"model_id": "'
            for _ in range(64):
                yield b"a" * MIB
            yield b'"}'

        response = server.client.post(
            "/v1/builds", content=chunked(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert watch.growth_mib() < 32, watch.growth_mib()
        small = server.client.post("/v1/builds", json={"model_id": "0" * 64, "precision": "fp32"})
        assert small.status_code == 404  # a body within the cap reaches its route
