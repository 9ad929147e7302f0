"""Inputs that once crashed a request into a 500: each is now a 4xx a person can act on.

Over real HTTP against the session's real server (tests.server). Every answer is checked for its
status, its error code and for the absence of internal detail (source paths, tracebacks).
"""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest

from tests.api.serving_helpers import build_engine, upload_model
from tests.model_factory import resnet_block_classifier, shape_expander

pytestmark = pytest.mark.timeout(120)

HUGE_INTEGER = "9" * 5000  # past Python's int-digit limit (4300), which json.loads enforces
NPZ = "application/x-npz"
RAW = "application/x-numpy"


@pytest.fixture(scope="module")
def classifier_engine(api: httpx.Client) -> str:
    return build_engine(api, upload_model(api, resnet_block_classifier(seed=5)))


@pytest.fixture(scope="module")
def expander_engine(api: httpx.Client) -> str:
    return build_engine(api, upload_model(api, shape_expander()))


def assert_clean_4xx(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    error: dict[str, object] = response.json()["error"]
    assert error["code"] == code
    assert (
        ".cc:" not in response.text
        and "Traceback" not in response.text
        and "/onnxruntime_src" not in response.text
    )
    return error


def npz_with_header(shape: tuple[int, ...]) -> bytes:
    """An npz whose one member declares ``shape`` in its .npy header, with 4 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("input.npy", header.getvalue() + bytes(4))
    return buffer.getvalue()


def test_a_huge_integer_in_preprocess_json_is_a_400(api: httpx.Client) -> None:
    response = api.post(
        "/v1/calibration-sets",
        files={"file": ("x.zip", b"PK\x05\x06" + bytes(18))},
        data={"preprocess": f'{{"size": [{HUGE_INTEGER}, 8]}}'},
    )
    error = assert_clean_4xx(response, 400, "bad_input")
    assert "preprocess" in str(error["message"])


def test_deeply_nested_preprocess_json_is_a_400(api: httpx.Client) -> None:
    response = api.post(
        "/v1/calibration-sets",
        files={"file": ("x.zip", b"PK\x05\x06" + bytes(18))},
        data={"preprocess": "[" * 100_000},
    )
    error = assert_clean_4xx(response, 400, "bad_input")
    assert "nested too deeply" in str(error["message"])


def test_a_huge_integer_in_infer_json_is_a_400(api: httpx.Client, classifier_engine: str) -> None:
    body = f'{{"inputs": {{"input": [{HUGE_INTEGER}]}}}}'
    response = api.post(
        f"/v1/engines/{classifier_engine}/infer", content=body, headers={"content-type": "application/json"}
    )
    assert_clean_4xx(response, 400, "invalid_inference_input")


def test_deeply_nested_infer_json_is_a_400(api: httpx.Client, classifier_engine: str) -> None:
    body = '{"inputs": {"input": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    response = api.post(
        f"/v1/engines/{classifier_engine}/infer", content=body, headers={"content-type": "application/json"}
    )
    assert_clean_4xx(response, 400, "invalid_inference_input")


@pytest.mark.parametrize(
    ("shape", "words"), [((-1, -1), "negative dimension"), ((1,) * 100, "100 dimensions")]
)
def test_npz_members_with_impossible_shapes_are_a_400(
    api: httpx.Client, classifier_engine: str, shape: tuple[int, ...], words: str
) -> None:
    response = api.post(
        f"/v1/engines/{classifier_engine}/infer",
        content=npz_with_header(shape),
        headers={"content-type": NPZ},
    )
    error = assert_clean_4xx(response, 400, "invalid_inference_input")
    assert words in str(error["message"])


def test_a_raw_tensor_shape_with_100_dimensions_is_a_400(api: httpx.Client, classifier_engine: str) -> None:
    headers = {"content-type": RAW, "x-tensor-dtype": "float32", "x-tensor-shape": ",".join(["1"] * 100)}
    response = api.post(f"/v1/engines/{classifier_engine}/infer", content=bytes(4), headers=headers)
    error = assert_clean_4xx(response, 400, "invalid_inference_input")
    assert "100 dimensions" in str(error["message"])


def test_a_model_that_cannot_allocate_its_output_is_a_422_without_internal_paths(
    api: httpx.Client, expander_engine: str
) -> None:
    ok = api.post(f"/v1/engines/{expander_engine}/infer", json={"inputs": {"shape": [3]}})
    assert ok.status_code == 200 and ok.json()["outputs"]["out"] == [1.0, 1.0, 1.0]
    response = api.post(f"/v1/engines/{expander_engine}/infer", json={"inputs": {"shape": [1 << 40]}})
    error = assert_clean_4xx(response, 422, "model_run_failed")
    assert "Failed to allocate memory" in str(error["message"])
    assert "onnxruntime::" not in json.dumps(error)
