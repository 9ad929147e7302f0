"""POST /v1/engines/{id}/infer over real HTTP: JSON, npz and raw tensors in and out, and every refusal."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from contextlib import AbstractContextManager

import httpx
import numpy as np
import onnxruntime
import pytest

from service.backends.registry import get_backend
from tests.api.serving_helpers import build_engine, upload_model
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder

CLASSIFIER = resnet_block_classifier(seed=21)
RAW = "application/x-numpy"


@pytest.fixture(scope="module")
def engine_id(api: httpx.Client) -> str:
    return build_engine(api, upload_model(api, CLASSIFIER))


@pytest.fixture(scope="module")
def adder_engine_id(api: httpx.Client) -> str:
    return build_engine(api, upload_model(api, two_input_adder()))


def _image(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)


def _expected(image: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes(CLASSIFIER), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"input": image})[0])


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs type **kwds as allow_pickle
    return buffer.getvalue()


def test_json_inputs_give_the_model_outputs(api: httpx.Client, engine_id: str) -> None:
    image = _image()
    response = api.post(f"/v1/engines/{engine_id}/infer", json={"inputs": {"input": image.tolist()}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["engine_id"] == engine_id and body["backend"] == "onnxruntime" and body["precision"] == "fp32"
    np.testing.assert_allclose(np.array(body["outputs"]["logits"]), _expected(image), rtol=1e-4, atol=1e-5)


def test_npz_inputs_are_answered_in_npz_with_the_same_values_as_json(
    api: httpx.Client, engine_id: str
) -> None:
    image = _image(3)
    response = api.post(
        f"/v1/engines/{engine_id}/infer",
        content=_npz(input=image),
        headers={"content-type": "application/x-npz"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(response.content), allow_pickle=False) as outputs:
        logits = outputs["logits"]
    assert logits.dtype == np.float32 and logits.shape == (3, 10)
    as_json = api.post(f"/v1/engines/{engine_id}/infer", json={"inputs": {"input": image.tolist()}}).json()
    np.testing.assert_array_equal(logits, np.array(as_json["outputs"]["logits"], np.float32))


def test_raw_tensor_bytes_are_answered_as_raw_bytes_with_dtype_and_shape_headers(
    api: httpx.Client, engine_id: str
) -> None:
    image = _image(1)
    response = api.post(
        f"/v1/engines/{engine_id}/infer",
        content=image.tobytes(),
        headers={"content-type": RAW, "x-tensor-dtype": "float32", "x-tensor-shape": "1,3,16,16"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == RAW
    assert (response.headers["x-tensor-dtype"], response.headers["x-tensor-shape"]) == ("float32", "1,10")
    assert response.headers["x-tensor-name"] == "logits"
    logits = np.frombuffer(response.content, np.float32).reshape(1, 10)
    np.testing.assert_allclose(logits, _expected(image), rtol=1e-4, atol=1e-5)


def test_accept_picks_the_answer_format(api: httpx.Client, engine_id: str) -> None:
    response = api.post(
        f"/v1/engines/{engine_id}/infer",
        json={"inputs": {"input": _image(1).tolist()}},
        headers={"accept": "application/x-npz"},
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-npz"
    with np.load(io.BytesIO(response.content)) as outputs:
        assert outputs["logits"].shape == (1, 10)


def test_multi_input_engines_take_npz_and_pick_one_output_for_raw_answers(
    api: httpx.Client, adder_engine_id: str
) -> None:
    feeds = {"image": np.ones((1, 3, 8, 8), np.float32), "bias_map": np.full((1, 4, 8, 8), 2.0, np.float32)}
    response = api.post(
        f"/v1/engines/{adder_engine_id}/infer",
        content=_npz(**feeds),
        headers={"content-type": "application/x-npz", "accept": RAW},
    )
    assert response.status_code == 200, response.text
    out = np.frombuffer(response.content, np.float32).reshape(1, 4, 8, 8)
    assert (out >= 2.0).all()
    raw = api.post(
        f"/v1/engines/{adder_engine_id}/infer",
        content=b"\0" * 4,
        headers={"content-type": RAW, "x-tensor-dtype": "float32", "x-tensor-shape": "1"},
    )
    assert raw.status_code == 400
    assert "takes 2 inputs" in raw.json()["error"]["message"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"image": [[0.0]]}, r"missing \['input'\], unexpected \['image'\]"),
        ({"input": [[[0.0] * 16] * 16] * 3}, r"rank 3 \(shape \[3, 16, 16\]\)"),
        ({"input": [[[[0.0] * 15] * 16] * 3]}, r"axis 3 is fixed at 16, got 15"),
        ({"input": [[[[True] * 16] * 16] * 3]}, r"true/false values"),
    ],
)
def test_json_inputs_that_do_not_fit_are_400_with_the_reason(
    api: httpx.Client, engine_id: str, inputs: dict[str, object], message: str
) -> None:
    response = api.post(f"/v1/engines/{engine_id}/infer", json={"inputs": inputs})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_inference_input"
    assert re.search(message, error["message"]), error["message"]


def test_binary_inputs_of_the_wrong_dtype_are_400_and_never_cast(api: httpx.Client, engine_id: str) -> None:
    response = api.post(
        f"/v1/engines/{engine_id}/infer",
        content=_npz(input=_image(1).astype(np.float64)),
        headers={"content-type": "application/x-npz"},
    )
    assert response.status_code == 400
    assert "is float64, but the engine expects float32" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({"content-type": "text/plain"}, b"hello", "Unsupported Content-Type 'text/plain'"),
        ({"content-type": "application/json"}, b"{oops", "not valid JSON"),
        ({"content-type": "application/x-npz"}, b"not a zip", "not an npz"),
        ({"content-type": RAW, "x-tensor-dtype": "float32"}, b"\0" * 4, "X-Tensor-Shape header"),
    ],
)
def test_malformed_bodies_are_400(
    api: httpx.Client, engine_id: str, headers: dict[str, str], body: bytes, message: str
) -> None:
    response = api.post(f"/v1/engines/{engine_id}/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_an_unknown_output_choice_is_400_before_running(api: httpx.Client, engine_id: str) -> None:
    response = api.post(
        f"/v1/engines/{engine_id}/infer",
        params={"output": "probs"},
        json={"inputs": {"input": _image(1).tolist()}},
    )
    assert response.status_code == 400
    assert "output 'probs' is not an output of this engine" in response.json()["error"]["message"]


def test_an_unknown_engine_is_404(api: httpx.Client) -> None:
    response = api.post(f"/v1/engines/{'0' * 64}/infer", json={"inputs": {}})
    assert response.status_code == 404
    assert "No engine with id" in response.json()["error"]["message"]


def test_an_engine_that_cannot_run_here_is_409_naming_the_onnxruntime_engine(api: httpx.Client) -> None:
    if get_backend("tensorrt-rtx").available().can_run:
        pytest.skip("this host runs TensorRT-RTX engines")
    model = resnet_block_classifier(seed=22)
    model_id = upload_model(api, model)
    rtx_id = build_engine(api, model_id, backend="tensorrt-rtx")
    first = api.post(f"/v1/engines/{rtx_id}/infer", json={"inputs": {"input": _image(1).tolist()}})
    assert first.status_code == 409
    error = first.json()["error"]
    assert error["code"] == "engine_not_runnable_here"
    assert "No engine of this model runs here yet" in error["message"]
    assert json.dumps(error["details"]["suggested_build"]["backend"]) == '"onnxruntime"'
    ort_id = build_engine(api, model_id)
    second = api.post(f"/v1/engines/{rtx_id}/infer", json={"inputs": {"input": _image(1).tolist()}})
    assert second.status_code == 409
    assert (
        f"Engine {ort_id} (fp32, onnxruntime) of the same model runs here"
        in second.json()["error"]["message"]
    )
    assert second.json()["error"]["details"]["runnable_engine_id"] == ort_id


def test_bodies_over_the_limit_are_413(
    start_server: Callable[..., AbstractContextManager[httpx.Client]],
) -> None:
    with start_server(max_upload_bytes=200_000) as client:
        engine = build_engine(client, upload_model(client, CLASSIFIER))
        image = np.zeros((100, 3, 16, 16), np.float32)  # 307 kB
        response = client.post(
            f"/v1/engines/{engine}/infer",
            content=image.tobytes(),
            headers={"content-type": RAW, "x-tensor-dtype": "float32", "x-tensor-shape": "100,3,16,16"},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"
        assert "200000" in response.json()["error"]["message"]


def test_a_deleted_engine_is_not_served_from_its_warm_runner(api: httpx.Client) -> None:
    from tests.api.conftest import build_engine
    from tests.model_factory import model_bytes, resnet_block_classifier

    upload = {"file": ("w.onnx", model_bytes(resnet_block_classifier(seed=81)))}
    model_id = api.post("/v1/models", files=upload).json()["id"]
    engine_id = build_engine(api, model_id=model_id, precision="fp32", backend="onnxruntime")["engine_id"]
    feeds = {"inputs": {"input": _image().tolist()}}
    assert api.post(f"/v1/engines/{engine_id}/infer", json=feeds).status_code == 200  # now warm
    assert api.delete(f"/v1/engines/{engine_id}").status_code == 204
    assert api.post(f"/v1/engines/{engine_id}/infer", json=feeds).status_code == 404
