"""Preprocess amplification: a tiny image archive asking for huge samples is refused before decoding.

Eight 48x40 PNGs (a couple of kB zipped) with ``size = [8192, 8192]`` would make 6 GiB of float32
samples. The server process must answer 413 naming the limit and its setting, without its peak
memory moving, and store nothing.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.restart.server_process import StoredState
from tests.robustness.conftest import MemoryWatch, StartServer

pytestmark = pytest.mark.timeout(120)

MEMORY_BOUND_MIB = 48


def small_png_zip(count: int) -> bytes:
    rng = np.random.default_rng(1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(count):
            image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
            encoded = io.BytesIO()
            image.save(encoded, format="PNG")
            archive.writestr(f"img{index}.png", encoded.getvalue())
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("size", "setting"),
    [
        ([8192, 8192], "ENGINE_SERVICE_MAX_PREPROCESSED_SAMPLE_BYTES"),  # 805 MB per sample
        ([4096, 4096], "ENGINE_SERVICE_MAX_PREPROCESSED_BYTES"),  # 201 MB each, 1.6 GB for the set
    ],
)
def test_huge_preprocess_sizes_are_refused_before_decoding(
    server_process: StartServer, size: list[int], setting: str
) -> None:
    archive = small_png_zip(8)
    assert len(archive) < 64 * 1024
    settings = {"MAX_PREPROCESSED_BYTES": str(1024**3)}
    with server_process(**settings) as server:
        watch = MemoryWatch(server)
        response = server.client.post(
            "/v1/calibration-sets",
            files={"file": ("small.zip", archive)},
            data={"preprocess": json.dumps({"size": size})},
        )
        assert response.status_code == 413, response.text
        assert setting in response.json()["error"]["message"]
        assert watch.growth_mib() < MEMORY_BOUND_MIB
        state = StoredState.read(server.data)
        assert not state.calibration_dirs and not state.temporaries


def test_a_crop_fraction_that_would_blow_up_the_resize_step_is_refused(server_process: StartServer) -> None:
    with server_process() as server:
        response = server.client.post(
            "/v1/calibration-sets",
            files={"file": ("small.zip", small_png_zip(2))},
            data={
                "preprocess": json.dumps(
                    {"size": [64, 64], "resize": "shorter_side_center_crop", "crop_fraction": 0.001}
                )
            },
        )
        assert response.status_code == 413, response.text
        assert "crop_fraction" in response.json()["error"]["message"]


def test_a_sensible_preprocess_is_still_stored(server_process: StartServer) -> None:
    with server_process() as server:
        response = server.client.post(
            "/v1/calibration-sets",
            files={"file": ("small.zip", small_png_zip(8))},
            data={"preprocess": json.dumps({"size": [32, 32]})},
        )
        assert response.status_code == 201, response.text
        assert response.json()["samples"] == 8
