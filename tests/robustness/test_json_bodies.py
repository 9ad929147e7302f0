"""JSON /infer bodies: parsed JSON costs about ten times its bytes, so JSON has its own, smaller cap.

Against a server process: a JSON body over ENGINE_SERVICE_MAX_JSON_INFER_BYTES is refused with a 413
naming that setting before it is parsed, and the server's peak memory stays near where it was; the
same tensor in a binary form (npz) within the general limit is still served.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from tests.api.serving_helpers import build_engine, upload_model
from tests.model_factory import relu_of_shape
from tests.robustness.conftest import MemoryWatch, StartServer

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024


def test_a_json_body_over_its_cap_is_refused_before_parsing(server_process: StartServer) -> None:
    with server_process(MAX_JSON_INFER_BYTES=str(4 * MIB)) as server:
        engine_id = build_engine(server.client, upload_model(server.client, relu_of_shape(["n", 1024])))
        rows = ",".join(["[" + ",".join(["0.5"] * 1024) + "]"] * 2000)  # about 8 MiB of JSON
        body = ('{"inputs": {"x": [' + rows + "]}}").encode()
        assert len(body) > 4 * MIB
        watch = MemoryWatch(server)
        response = server.client.post(
            f"/v1/engines/{engine_id}/infer", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, response.text
        assert "ENGINE_SERVICE_MAX_JSON_INFER_BYTES" in response.json()["error"]["message"]
        assert watch.growth_mib() < 32

        buffer = io.BytesIO()
        np.savez(buffer, x=np.full((2000, 1024), 0.5, np.float32))
        binary = server.client.post(
            f"/v1/engines/{engine_id}/infer",
            content=buffer.getvalue(),
            headers={"content-type": "application/x-npz"},
        )
        assert binary.status_code == 200, binary.text
