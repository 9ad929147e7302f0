"""Model intake over real HTTP: upload forms, records, downloads, deletes and every bad input."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.model_factory import model_bytes, resnet_block_classifier


def _stored_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "models").rglob("*") if p.is_file())


def test_upload_multipart_creates_record_with_io_and_op_counts(api: httpx.Client) -> None:
    data = model_bytes(resnet_block_classifier(seed=11))
    response = api.post("/v1/models", files={"file": ("classifier.onnx", data)})
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["id"] == hashlib.sha256(data).hexdigest()
    assert record["name"] == "classifier.onnx"
    assert record["size_bytes"] == len(data)
    assert record["opset"] == 17
    assert record["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["N", 3, 16, 16]}]
    assert record["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["N", 10]}]
    assert record["op_counts"]["Conv"] == 4
    assert record["op_counts"]["BatchNormalization"] == 3
    assert record["quantization"] == {
        "explicit": False,
        "qdq_pairs": 0,
        "per_channel_weights": 0,
        "quantized_ops": {},
    }


def test_same_bytes_uploaded_twice_returns_200_and_the_same_record(api: httpx.Client) -> None:
    data = model_bytes(resnet_block_classifier(seed=12))
    first = api.post("/v1/models", files={"file": ("a.onnx", data)})
    second = api.post(
        "/v1/models",
        content=data,
        params={"name": "b.onnx"},
        headers={"content-type": "application/octet-stream"},
    )
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == first.json()


def test_raw_body_upload_takes_the_name_from_the_query(api: httpx.Client, resnet50_bytes: bytes) -> None:
    response = api.post(
        "/v1/models",
        content=resnet50_bytes,
        params={"name": "resnet50"},
        headers={"content-type": "application/octet-stream"},
    )
    assert response.status_code in (200, 201)
    record = response.json()
    assert record["name"] == "resnet50"
    assert record["inputs"][0]["name"] == "gpu_0/data_0"
    assert record["inputs"][0]["shape"] == [1, 3, 224, 224]
    assert record["op_counts"]["Conv"] == 53


def test_download_returns_the_exact_bytes_with_digest_header(api: httpx.Client) -> None:
    data = model_bytes(resnet_block_classifier(seed=13))
    model_id = api.post("/v1/models", files={"file": ("c.onnx", data)}).json()["id"]
    response = api.get(f"/v1/models/{model_id}/onnx")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["x-content-sha256"] == model_id


def test_list_and_read_and_delete(api: httpx.Client) -> None:
    data = model_bytes(resnet_block_classifier(seed=14))
    model_id = api.post("/v1/models", files={"file": ("d.onnx", data)}).json()["id"]
    assert model_id in {m["id"] for m in api.get("/v1/models").json()}
    assert api.get(f"/v1/models/{model_id}").json()["id"] == model_id
    assert api.delete(f"/v1/models/{model_id}").status_code == 204
    assert api.get(f"/v1/models/{model_id}").status_code == 404
    assert api.get(f"/v1/models/{model_id}/onnx").status_code == 404


@pytest.mark.parametrize("path", ["/v1/models/{}", "/v1/models/{}/onnx", "/v1/models/{}/fusions"])
def test_unknown_model_ids_are_404_with_a_message(api: httpx.Client, path: str) -> None:
    response = api.get(path.format("0" * 64))
    assert response.status_code == 404
    assert "No model" in response.json()["error"]["message"]


def test_delete_of_unknown_model_is_404(api: httpx.Client) -> None:
    assert api.delete("/v1/models/" + "a" * 64).status_code == 404


def test_qdq_model_reports_explicit_quantization(api: httpx.Client) -> None:
    # x -> Q -> DQ -> Conv(w: int8 -> DQ per-channel) -> y
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int8), "w_q")
    inits = [
        w,
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=0),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    response = api.post("/v1/models", files={"file": ("qdq.onnx", model.SerializeToString())})
    assert response.status_code == 201, response.text
    assert response.json()["quantization"] == {
        "explicit": True,
        "qdq_pairs": 1,
        "per_channel_weights": 1,
        "quantized_ops": {"Conv": 2},
    }


def _external_data_model(tmp_path: Path) -> bytes:
    model = resnet_block_classifier(seed=15)
    onnx.external_data_helper.convert_model_to_external_data(model, location="weights.bin", size_threshold=0)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    return (tmp_path / "m.onnx").read_bytes()


def _invalid_graph() -> bytes:
    # A Relu whose input is produced by nothing: the checker rejects it.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["missing"], ["y"], name="relu")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("case", "expected_status", "message"),
    [
        ("not_onnx", 400, "not an ONNX model"),
        ("text", 400, "not an ONNX model"),
        ("truncated", 400, "not an ONNX model"),
        ("invalid_graph", 400, "invalid"),
        ("external_data", 400, "external file"),
        ("empty", 400, "empty"),
    ],
)
def test_bad_uploads_get_a_clear_error_and_store_nothing(
    api: httpx.Client, server_root: Path, tmp_path: Path, case: str, expected_status: int, message: str
) -> None:
    good = model_bytes(resnet_block_classifier(seed=16))
    payloads = {
        "not_onnx": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,
        "text": b"hello, this is not a model\n" * 10,
        "truncated": good[: len(good) // 2],
        "invalid_graph": _invalid_graph(),
        "external_data": _external_data_model(tmp_path),
        "empty": b"",
    }
    before_files = _stored_files(server_root)
    before_ids = {m["id"] for m in api.get("/v1/models").json()}
    response = api.post("/v1/models", files={"file": ("m.onnx", payloads[case])})
    assert response.status_code == expected_status, response.text
    assert message in response.json()["error"]["message"]
    assert _stored_files(server_root) == before_files
    assert {m["id"] for m in api.get("/v1/models").json()} == before_ids


def test_empty_raw_body_is_rejected(api: httpx.Client) -> None:
    response = api.post("/v1/models", content=b"", headers={"content-type": "application/octet-stream"})
    assert response.status_code == 400
    assert "empty" in response.json()["error"]["message"]


def test_multipart_without_file_field_is_rejected(api: httpx.Client) -> None:
    response = api.post("/v1/models", data={"name": "x"}, files={"other": ("x.onnx", b"123")})
    assert response.status_code == 400
    assert "'file'" in response.json()["error"]["message"]


@pytest.mark.parametrize("form", ["multipart", "raw", "raw_chunked"])
def test_oversized_upload_is_413_and_leaves_nothing(start_server, tmp_path: Path, form: str) -> None:  # type: ignore[no-untyped-def]
    data = model_bytes(resnet_block_classifier(seed=17))
    with start_server(max_upload_bytes=1000) as client:
        if form == "multipart":
            response = client.post("/v1/models", files={"file": ("big.onnx", data)})
        elif form == "raw":
            response = client.post(
                "/v1/models", content=data, headers={"content-type": "application/octet-stream"}
            )
        else:
            response = client.post(
                "/v1/models",
                content=iter([data[:500], data[500:]]),
                headers={"content-type": "application/octet-stream"},
            )
        assert response.status_code == 413, response.text
        assert "limit" in response.json()["error"]["message"]
        assert client.get("/v1/models").json() == []
    assert [p for p in (tmp_path / "server" / "models").rglob("*") if p.is_file()] == []


def test_fusion_report_of_resnet50_counts_its_conv_bn_patterns(
    api: httpx.Client, resnet50_bytes: bytes
) -> None:
    model_id = api.post("/v1/models", files={"file": ("resnet50.onnx", resnet50_bytes)}).json()["id"]
    report = api.get(f"/v1/models/{model_id}/fusions").json()
    kinds = report["summary"]["by_kind"]
    assert kinds["conv_bn_relu"]["count"] == 33
    assert kinds["conv_bn_add"]["count"] == 16
    assert report["explicit_quantization"] is False
    first = next(p for p in report["patterns"] if p["kind"] == "conv_bn_add")
    assert first["int8_fusable"] is True and first["blockers"] == []
    assert len(first["nodes"]) >= 3


def test_fusion_report_names_the_blocker_of_an_unquantized_residual(api: httpx.Client) -> None:
    # x -Q/DQ-> Conv(w DQ) -> BN -> Add(residual = raw x, no Q/DQ) -> y
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.integers(-5, 5, (3, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
        numpy_helper.from_array(np.full(3, 0.01, np.float32), "w_s"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"),
        *(
            numpy_helper.from_array(np.ones(3, np.float32) * v, n)
            for n, v in (("bn_scale", 1.0), ("bn_bias", 0.0), ("bn_mean", 0.0), ("bn_var", 1.0))
        ),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"], name="q"),
        helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="w_dq", axis=0),
        helper.make_node("Conv", ["x_dq", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b"], name="bn"
        ),
        helper.make_node("Add", ["b", "x"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    model_id = api.post("/v1/models", files={"file": ("res.onnx", model.SerializeToString())}).json()["id"]
    report = api.get(f"/v1/models/{model_id}/fusions").json()
    (pattern,) = [p for p in report["patterns"] if p["kind"] == "conv_bn_add"]
    assert pattern["int8_fusable"] is False
    assert any("residual" in blocker.lower() for blocker in pattern["blockers"])
    assert report["summary"]["blocked"] >= 1
