"""Identical calibration uploads at the same moment: one stored copy, every client 200/201, no 500.

Eight clients post the same image archive to a server process at once (a barrier releases them
together). Exactly one creates the set (201), the others get that same set (200); one directory and
one row exist afterwards and no temporary directory is left.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.restart.server_process import StoredState
from tests.robustness.conftest import StartServer
from tests.robustness.test_preprocess_amplification import small_png_zip

pytestmark = pytest.mark.timeout(120)

CLIENTS = 8


def test_eight_identical_uploads_at_once_store_one_set(server_process: StartServer) -> None:
    archive = small_png_zip(16)
    preprocess = json.dumps({"size": [64, 64]})
    with server_process() as server:
        barrier = threading.Barrier(CLIENTS)
        base_url = str(server.client.base_url)

        def upload(_: int) -> httpx.Response:
            with httpx.Client(base_url=base_url, timeout=60) as client:
                barrier.wait()
                return client.post(
                    "/v1/calibration-sets",
                    files={"file": ("same.zip", archive)},
                    data={"preprocess": preprocess},
                )

        with ThreadPoolExecutor(CLIENTS) as pool:
            responses = list(pool.map(upload, range(CLIENTS)))
        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200] * (CLIENTS - 1) + [201], [r.text for r in responses if r.status_code >= 300]
        assert len({response.json()["id"] for response in responses}) == 1
        state = StoredState.read(server.data)
        assert len(state.calibration_dirs) == 1 and len(state.calibration_rows) == 1
        assert state.calibration_dirs == state.calibration_rows
        assert not state.temporaries
