"""Decompression bombs in calibration uploads, over real HTTP against a server process.

Each bomb is a small ``.npz`` whose member inflates to hundreds of MiB. The server must refuse it
with a 413 that names the limit and its setting, keep its peak memory flat while doing so, and leave
nothing stored; a large but honest member within the limits is stored with bounded memory too.
"""

from __future__ import annotations

import io
import zipfile

import httpx
import numpy as np
import pytest

from tests.restart.server_process import ServerProcess, StoredState
from tests.robustness.conftest import MemoryWatch, StartServer

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
# The server must not hold more than a few read chunks of a member in memory at once.
MEMORY_BOUND_MIB = 96


def zero_npz(samples: int, width: int, compression: int) -> bytes:
    """An .npz with one float32 member of zeros, shape (samples, width), written without holding it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (samples, width)}
    )
    buffer = io.BytesIO()
    zeros = bytes(16 * MIB)
    remaining = samples * width * 4
    with (
        zipfile.ZipFile(buffer, "w", compression) as archive,
        archive.open("input.npy", "w", force_zip64=True) as member,
    ):
        member.write(header.getvalue())
        while remaining:
            member.write(zeros[: min(remaining, len(zeros))])
            remaining -= min(remaining, len(zeros))
    return buffer.getvalue()


def upload(server: ServerProcess, data: bytes) -> httpx.Response:
    return server.client.post("/v1/calibration-sets", files={"file": ("bomb.npz", data)})


@pytest.mark.parametrize(
    ("compression", "label"), [(zipfile.ZIP_DEFLATED, "deflate"), (zipfile.ZIP_BZIP2, "bzip2")]
)
def test_a_compressed_npz_bomb_is_refused_by_its_expansion_ratio(
    server_process: StartServer, compression: int, label: str
) -> None:
    bomb = zero_npz(1, 2**26, compression)  # 256 MiB of float32 zeros in one sample
    assert len(bomb) < MIB  # deflate: ~260 kB, bzip2: a few hundred bytes
    with server_process(MAX_UPLOAD_BYTES=str(MIB)) as server:
        watch = MemoryWatch(server)
        response = upload(server, bomb)
        assert response.status_code == 413, response.text
        body = response.json()["error"]
        assert "ENGINE_SERVICE_MAX_ARCHIVE_EXPANSION_RATIO" in body["message"], label
        assert body["details"]["limit"] == "max_archive_expansion_ratio"
        assert watch.growth_mib() < MEMORY_BOUND_MIB
        assert server.client.get("/v1/calibration-sets").json() == []
        state = StoredState.read(server.data)
        assert not state.calibration_dirs and not state.temporaries


def test_an_npz_member_over_the_member_limit_is_refused(server_process: StartServer) -> None:
    archive = zero_npz(4, 2**20, zipfile.ZIP_DEFLATED)  # 16 MiB member
    limits = {"MAX_ARCHIVE_MEMBER_BYTES": str(8 * MIB), "MAX_ARCHIVE_EXPANSION_RATIO": "100000"}
    with server_process(**limits) as server:
        response = upload(server, archive)
        assert response.status_code == 413, response.text
        assert "ENGINE_SERVICE_MAX_ARCHIVE_MEMBER_BYTES" in response.json()["error"]["message"]
        assert response.json()["error"]["details"]["limit"] == "max_archive_member_bytes"
        assert not StoredState.read(server.data).calibration_dirs


def test_an_npz_whose_members_together_pass_the_set_limit_is_refused(server_process: StartServer) -> None:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, a=rng.random((4, 256, 1024), np.float32), b=rng.random((4, 256, 1024), np.float32))
    with server_process(
        MAX_ARCHIVE_UNCOMPRESSED_BYTES=str(6 * MIB), MAX_ARCHIVE_MEMBER_BYTES=str(5 * MIB)
    ) as server:
        response = server.client.post("/v1/calibration-sets", files={"file": ("two.npz", buffer.getvalue())})
        assert response.status_code == 413, response.text
        assert "ENGINE_SERVICE_MAX_ARCHIVE_UNCOMPRESSED_BYTES" in response.json()["error"]["message"]
        assert not StoredState.read(server.data).calibration_dirs


def test_one_huge_sample_within_the_limits_is_stored_with_bounded_memory(server_process: StartServer) -> None:
    archive = zero_npz(1, 2**26, zipfile.ZIP_DEFLATED)  # one 256 MiB sample: no whole sample in memory
    with server_process(MAX_ARCHIVE_EXPANSION_RATIO="100000") as server:
        watch = MemoryWatch(server)
        response = upload(server, archive)
        assert response.status_code == 201, response.text
        assert response.json()["samples"] == 1
        assert response.json()["inputs"][0]["shape"] == [2**26]
        assert response.json()["inputs"][0]["stats"]["max"] == [0.0]
        assert watch.growth_mib() < MEMORY_BOUND_MIB
