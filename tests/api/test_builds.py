"""Builds and engines over real HTTP: real TensorRT-RTX and ONNX Runtime builds, the cache, downloads."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest

from tests.api.conftest import build_engine, wait_for_job
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.quantize import graphs


def test_rtx_int8_build_reports_int8_layers_fusions_and_accuracy(
    api: httpx.Client, rtx_int8_engine: dict[str, Any]
) -> None:
    engine = api.get(f"/v1/engines/{rtx_int8_engine['engine_id']}").json()
    assert engine["backend"] == "tensorrt-rtx" and engine["precision"] == "int8"
    assert "no GPU" in engine["device"] or "sm_" in engine["device"]
    assert engine["layer_counts"]["int8"] >= 4  # four Conv + two Gemm quantized; RTX reports each
    summary = engine["fusion_summary"]
    assert summary["conv_bn_relu_total"] == 2 and summary["conv_bn_add_total"] == 1
    accuracy = engine["accuracy"]
    assert accuracy["measured_with"].startswith("onnxruntime")
    assert accuracy["outputs"][0]["cosine"] > 0.99
    assert accuracy["outputs"][0]["top1_agreement"] >= 0.8
    assert engine["has_calibration_cache"] is True


def test_engine_fusion_report_explains_int8_epilogues(
    api: httpx.Client, rtx_int8_engine: dict[str, Any]
) -> None:
    report = api.get(f"/v1/engines/{rtx_int8_engine['engine_id']}/fusions").json()
    assert report["backend"] == "tensorrt-rtx"
    conv_patterns = [p for p in report["patterns"] if p["kind"].startswith("conv_bn")]
    assert conv_patterns and all(p["layers"] for p in conv_patterns)
    assert all(p["precision"] == "int8" for p in conv_patterns)
    assert all(p["status"] == "epilogue" and "kgen" in p["fused_as"] for p in conv_patterns)
    assert all("correlation" in p["explanation"] for p in conv_patterns)
    assert report["summary"]["int8_weighted_layer_share"] == 1.0


def test_downloads_return_verified_plan_calibration_cache_and_built_onnx(
    api: httpx.Client, rtx_int8_engine: dict[str, Any]
) -> None:
    engine_id = rtx_int8_engine["engine_id"]
    plan = api.get(f"/v1/engines/{engine_id}/plan")
    assert plan.status_code == 200
    assert hashlib.sha256(plan.content).hexdigest() == plan.headers["x-content-sha256"]
    assert (
        "attachment" in plan.headers["content-disposition"] and ".plan" in plan.headers["content-disposition"]
    )
    cache = api.get(f"/v1/engines/{engine_id}/calibration-cache")
    assert cache.status_code == 200 and cache.text.startswith("TRT-") and "EntropyCalibration2" in cache.text
    built = onnx.load_model_from_string(api.get(f"/v1/engines/{engine_id}/model.onnx").content)
    ops = {node.op_type for node in built.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_the_repeated_request_is_a_cache_hit(
    api: httpx.Client, classifier: dict[str, str], rtx_int8_engine: dict[str, Any]
) -> None:
    response = api.post(
        "/v1/builds",
        json={
            "model_id": classifier["model_id"],
            "precision": "int8",
            "backend": "tensorrt-rtx",
            "calibration_set_id": classifier["calibration_set_id"],
        },
    )
    assert response.status_code == 200
    assert response.json() == {"cache": "hit", "engine_id": rtx_int8_engine["engine_id"], "precision": "int8"}


def test_layers_endpoint_lists_onnx_nodes_per_engine_layer(
    api: httpx.Client, ort_fp32_engine: dict[str, Any]
) -> None:
    layers = api.get(f"/v1/engines/{ort_fp32_engine['engine_id']}/layers").json()
    assert layers["source"] == "optimized_graph"
    named = {node for layer in layers["layers"] for node in layer["onnx_nodes"]}
    assert {"stem_conv", "block_conv1", "fc1"} <= named


def test_concurrent_identical_requests_build_once(api: httpx.Client) -> None:
    model_id = api.post(
        "/v1/models", files={"file": ("c.onnx", model_bytes(resnet_block_classifier(seed=31)))}
    ).json()["id"]
    body = {"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(6)

    def request() -> None:
        barrier.wait()
        answers.append(api.post("/v1/builds", json=body))

    threads = [threading.Thread(target=request) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine_ids = {a.json()["engine_id"] for a in answers}
    job_ids = {a.json()["id"] for a in answers if a.status_code == 202}
    assert len(engine_ids) == 1 and len(job_ids) == 1, [a.json() for a in answers]
    wait_for_job(api, f"/v1/builds/{job_ids.pop()}")
    builds = [b for b in api.get("/v1/builds").json() if b["params"]["model_id"] == model_id]
    assert len(builds) == 1


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"precision": "int8", "calibration_set_id": None}, 400, "calibration_set_id"),
        ({"model_id": "0" * 64}, 404, "No model"),
        ({"precision": "int8", "calibration_set_id": "0" * 64}, 404, "No calibration set"),
        (
            {"shapes": {"nope": {"min": [1, 3, 16, 16], "opt": [1, 3, 16, 16], "max": [1, 3, 16, 16]}}},
            400,
            "not inputs of the model",
        ),
        ({"shapes": {"input": {"min": [1, 3, 16], "opt": [1, 3, 16], "max": [1, 3, 16]}}}, 400, "rank"),
        (
            {"shapes": {"input": {"min": [4, 3, 16, 16], "opt": [2, 3, 16, 16], "max": [8, 3, 16, 16]}}},
            400,
            "min <= opt <= max",
        ),
        (
            {"shapes": {"input": {"min": [1, 3, 8, 8], "opt": [1, 3, 16, 16], "max": [1, 3, 16, 16]}}},
            400,
            "fixed",
        ),
        ({"keep": ["no_such_layer"]}, 400, "no_such_layer"),
        ({"backend": "onnxruntime", "precision": "fp16"}, 400, "FP16"),
        ({"precision": "int4"}, 422, "precision"),
        ({"unexpected": 1}, 422, "unexpected"),
    ],
)
def test_bad_build_requests_are_rejected_before_any_job(
    api: httpx.Client, classifier: dict[str, str], change: dict[str, Any], status: int, message: str
) -> None:
    body: dict[str, Any] = {
        "model_id": classifier["model_id"],
        "precision": "fp32",
        "backend": "tensorrt-rtx",
    }
    body.update(change)
    before = len(api.get("/v1/builds").json())
    response = api.post("/v1/builds", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert len(api.get("/v1/builds").json()) == before


@pytest.mark.parametrize("path", ["", "/plan", "/fusions", "/layers", "/model.onnx", "/calibration-cache"])
def test_unknown_engine_ids_are_404(api: httpx.Client, path: str) -> None:
    assert api.get(f"/v1/engines/{'e' * 64}{path}").status_code == 404


def test_unknown_build_is_404(api: httpx.Client) -> None:
    assert api.get("/v1/builds/nope").status_code == 404
    assert api.delete("/v1/builds/nope").status_code == 404


def test_fp32_engine_has_no_calibration_cache(api: httpx.Client, ort_fp32_engine: dict[str, Any]) -> None:
    response = api.get(f"/v1/engines/{ort_fp32_engine['engine_id']}/calibration-cache")
    assert response.status_code == 404 and "not calibrated" in response.json()["error"]["message"]


def _plan_files(root: Path) -> list[Path]:
    return [p for p in (root / "engines" / "plans").rglob("*") if p.is_file()]


def test_a_queued_build_can_be_cancelled(start_server: Any) -> None:
    with start_server(job_workers=1) as client:
        model_id = client.post(
            "/v1/models", files={"file": ("m.onnx", model_bytes(resnet_block_classifier(seed=41)))}
        ).json()["id"]
        other = client.post(
            "/v1/models", files={"file": ("n.onnx", model_bytes(resnet_block_classifier(seed=42)))}
        ).json()["id"]
        first = client.post(
            "/v1/builds", json={"model_id": model_id, "precision": "fp16", "backend": "tensorrt-rtx"}
        )
        second = client.post(
            "/v1/builds", json={"model_id": other, "precision": "fp16", "backend": "tensorrt-rtx"}
        )
        cancelled = client.delete(f"/v1/builds/{second.json()['id']}").json()
        assert cancelled["status"] in ("cancelled", "running")  # running only if the first already finished
        final = wait_for_job(client, f"/v1/builds/{second.json()['id']}")
        assert wait_for_job(client, f"/v1/builds/{first.json()['id']}")["status"] == "succeeded"
        if cancelled["status"] == "cancelled":
            assert final["status"] == "cancelled" and final["engine_id"] is None
            retry = client.post(
                "/v1/builds", json={"model_id": other, "precision": "fp16", "backend": "tensorrt-rtx"}
            )
            assert retry.status_code == 202  # a cancelled build is not a cached engine


def test_least_recently_used_engines_are_evicted_over_the_budget(start_server: Any, tmp_path: Path) -> None:
    with start_server(engine_cache_bytes=12_000) as client:
        ids = []
        for seed in (51, 52):
            model_id = client.post(
                "/v1/models", files={"file": ("m.onnx", model_bytes(resnet_block_classifier(seed=seed)))}
            ).json()["id"]
            ids.append(
                build_engine(client, model_id=model_id, precision="fp32", backend="onnxruntime")["engine_id"]
            )
        listed = {e["id"] for e in client.get("/v1/engines").json()}
        assert ids[1] in listed and ids[0] not in listed
        assert client.get(f"/v1/engines/{ids[0]}").status_code == 404
        assert len(_plan_files(tmp_path / "server")) == 1


def test_a_damaged_plan_is_never_served_and_the_engine_is_rebuilt(start_server: Any, tmp_path: Path) -> None:
    with start_server() as client:
        model_id = client.post(
            "/v1/models", files={"file": ("m.onnx", model_bytes(resnet_block_classifier(seed=61)))}
        ).json()["id"]
        body = {"model_id": model_id, "precision": "fp32", "backend": "onnxruntime"}
        engine_id = build_engine(client, **body)["engine_id"]
        (plan,) = _plan_files(tmp_path / "server")
        data = bytearray(plan.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
        plan.write_bytes(bytes(data))
        response = client.get(f"/v1/engines/{engine_id}/plan")
        assert response.status_code == 404 and "damaged" in response.json()["error"]["message"]
        assert client.get(f"/v1/engines/{engine_id}").status_code == 404
        rebuilt = client.post("/v1/builds", json=body)
        assert rebuilt.status_code == 202
        job = wait_for_job(client, f"/v1/builds/{rebuilt.json()['id']}")
        assert job["status"] == "succeeded" and job["engine_id"] == engine_id
        assert onnx.load_model_from_string(client.get(f"/v1/engines/{engine_id}/plan").content) is not None


def test_delete_engine_removes_it(api: httpx.Client) -> None:
    model_id = api.post(
        "/v1/models", files={"file": ("m.onnx", model_bytes(resnet_block_classifier(seed=71)))}
    ).json()["id"]
    engine_id = build_engine(api, model_id=model_id, precision="fp32", backend="onnxruntime")["engine_id"]
    assert api.delete(f"/v1/models/{model_id}").status_code == 409  # engines still use it
    assert api.delete(f"/v1/engines/{engine_id}").status_code == 204
    assert api.get(f"/v1/engines/{engine_id}").status_code == 404


def test_a_yolov8_style_export_builds_fp16_on_tensorrt_rtx(api: httpx.Client) -> None:
    # Exporters' Cast(to=FLOAT) nodes made every such model fail FP16 typing ("already converted").
    pytest.importorskip("tensorrt_rtx")
    model_id = api.post(
        "/v1/models", files={"file": ("yolo.onnx", model_bytes(graphs.yolov8_style_head()))}
    ).json()["id"]

    job = build_engine(api, model_id=model_id, precision="fp16", backend="tensorrt-rtx")

    assert job["status"] == "succeeded", job.get("error")
    engine = api.get(f"/v1/engines/{job['engine_id']}").json()
    assert engine["precision"] == "fp16" and engine["backend"] == "tensorrt-rtx"
