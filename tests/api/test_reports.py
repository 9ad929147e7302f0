"""Benchmark, evaluation and comparison reports over real HTTP: jobs, JSON, HTML, PNG and refusals."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from service.backends.registry import get_backend
from service.reports.plots import LIMITS_KEY, PNG_SIGNATURE
from tests.api.serving_helpers import build_engine, upload_model, wait_for, wait_for_report
from tests.model_factory import resnet_block_classifier, two_input_adder

BENCH = {"batch_sizes": [1, 4], "warmup": 2, "iterations": 10}


@dataclass(frozen=True)
class Engines:
    model_id: str
    eval_set_id: str
    fp32: str
    int8: str
    rtx: str | None


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs type **kwds as allow_pickle
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engines(api: httpx.Client) -> Engines:
    model_id = upload_model(api, resnet_block_classifier(seed=31), "reports.onnx")
    samples = np.random.default_rng(31).standard_normal((40, 3, 16, 16)).astype(np.float32)
    uploaded = api.post(
        "/v1/calibration-sets", files={"file": ("set.npz", _npz(input=samples))}, data={"model_id": model_id}
    )
    assert uploaded.status_code in (200, 201), uploaded.text
    set_id = uploaded.json()["id"]
    fp32 = build_engine(api, model_id)
    int8 = build_engine(api, model_id, precision="int8", calibration_set_id=set_id)
    rtx = (
        None
        if get_backend("tensorrt-rtx").available().can_run
        else build_engine(api, model_id, backend="tensorrt-rtx")
    )
    return Engines(model_id=model_id, eval_set_id=set_id, fp32=fp32, int8=int8, rtx=rtx)


def test_a_benchmark_report_has_percentiles_per_batch_size_and_says_where_it_ran(
    api: httpx.Client, engines: Engines
) -> None:
    accepted = api.post(f"/v1/engines/{engines.fp32}/benchmark", json=BENCH)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["kind"] == "benchmark"
    report = wait_for_report(api, accepted.json()["id"])
    assert report["kind"] == "benchmark" and report["engine"]["engine_id"] == engines.fp32
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    for result in report["results"]:
        assert set(result["latency_ms"]) == {"count", "min", "mean", "std", "p50", "p90", "p95", "p99", "max"}
        assert result["latency_ms"]["count"] == 10
        assert result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
        assert result["throughput"]["inferences_per_s"] > 0
    device = report["measured_on"]["device"]
    assert device.startswith("CPU") and report["measured_on"]["backend"] == "onnxruntime"
    assert report["summary"].startswith(f"measured on {device} with onnxruntime")
    assert report["stage_timings"]["available"] is False
    assert "not available on this backend" in report["stage_timings"]["note"]


def test_a_finished_benchmark_renders_as_html_and_png(api: httpx.Client, engines: Engines) -> None:
    report_id = api.post(
        f"/v1/engines/{engines.fp32}/benchmark", json={"batch_sizes": [2], "iterations": 5}
    ).json()["id"]
    report = wait_for_report(api, report_id)
    page = api.get(f"/v1/reports/{report_id}.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert report["measured_on"]["device"] in page.text and "onnxruntime" in page.text
    assert "This is a CPU measurement" in page.text and "data:image/png;base64," in page.text
    png = api.get(f"/v1/reports/{report_id}.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(PNG_SIGNATURE)


def test_an_unfinished_report_has_no_page_yet_and_can_be_cancelled(
    api: httpx.Client, engines: Engines
) -> None:
    report_id = api.post(
        f"/v1/engines/{engines.fp32}/benchmark", json={"batch_sizes": [1], "duration_s": 60, "warmup": 0}
    ).json()["id"]
    for suffix in (".html", ".png"):
        early = api.get(f"/v1/reports/{report_id}{suffix}")
        assert early.status_code == 409
        assert "fetch it once GET" in early.json()["error"]["message"]
    assert api.get(f"/v1/reports/{report_id}").json()["status"] in ("queued", "running")
    assert api.delete(f"/v1/reports/{report_id}").status_code == 200
    final = wait_for(api, f"/v1/reports/{report_id}", timeout_s=30)
    assert final["status"] == "cancelled"
    late = api.get(f"/v1/reports/{report_id}.png")
    assert late.status_code == 409 and "cancelled and has nothing to show" in late.json()["error"]["message"]


def test_an_int8_evaluation_reports_accuracy_and_the_worst_layers(
    api: httpx.Client, engines: Engines
) -> None:
    accepted = api.post(
        f"/v1/engines/{engines.int8}/evaluate", json={"eval_set_id": engines.eval_set_id, "max_samples": 24}
    )
    assert accepted.status_code == 202, accepted.text
    report = wait_for_report(api, accepted.json()["id"])
    assert report["kind"] == "evaluation" and report["samples"] == 24
    assert report["reference"]["model_id"] == engines.model_id
    (logits,) = report["accuracy"]["outputs"]
    assert logits["name"] == "logits" and 0.9 < logits["cosine"] <= 1.0
    assert logits["top1_agreement"] is not None
    layers = report["layer_deltas"]
    assert layers["available"] is True and layers["compared_tensors"] > 0 and layers["samples"] == 16
    worst = layers["worst"]
    assert worst and worst == sorted(worst, key=lambda d: d["snr_db"])
    assert {"tensor", "node", "op_type", "cosine", "max_abs_error", "snr_db"} == set(worst[0])
    page = api.get(f"/v1/reports/{report['id']}.html")
    assert page.status_code == 200 and worst[0]["tensor"] in page.text
    assert "data:image/png;base64," in page.text
    png = api.get(f"/v1/reports/{report['id']}.png")
    assert png.status_code == 200 and png.content.startswith(PNG_SIGNATURE)
    limits = json.loads(Image.open(io.BytesIO(png.content)).text[LIMITS_KEY])  # type: ignore[attr-defined]
    assert limits["outputs"]["data"][0] == pytest.approx(logits["snr_db"])
    assert limits["outputs"]["ylim"][1] > logits["snr_db"]
    assert max(limits["layers"]["xlim"]) > max(d["snr_db"] for d in worst)


def test_evaluations_are_refused_up_front_when_they_cannot_run(api: httpx.Client, engines: Engines) -> None:
    unknown = api.post(f"/v1/engines/{engines.fp32}/evaluate", json={"eval_set_id": "0" * 64})
    assert unknown.status_code == 404 and "No calibration set" in unknown.json()["error"]["message"]
    other_model = upload_model(api, two_input_adder(), "adder.onnx")
    wrong = api.post(
        "/v1/calibration-sets",
        files={
            "file": (
                "w.npz",
                _npz(image=np.zeros((2, 3, 8, 8), np.float32), bias_map=np.zeros((2, 4, 8, 8), np.float32)),
            )
        },
        data={"model_id": other_model},
    )
    misfit = api.post(f"/v1/engines/{engines.fp32}/evaluate", json={"eval_set_id": wrong.json()["id"]})
    assert (
        misfit.status_code == 400 and "do not match the model's inputs" in misfit.json()["error"]["message"]
    )
    if engines.rtx is not None:
        blocked = api.post(f"/v1/engines/{engines.rtx}/evaluate", json={"eval_set_id": engines.eval_set_id})
        assert blocked.status_code == 409
        assert (
            engines.fp32 in blocked.json()["error"]["message"]
            or engines.int8 in blocked.json()["error"]["message"]
        )


def test_a_comparison_puts_the_engines_side_by_side(api: httpx.Client, engines: Engines) -> None:
    ids = [engines.fp32, engines.int8] + ([engines.rtx] if engines.rtx else [])
    accepted = api.post(
        "/v1/reports/comparison", json={"engine_ids": ids, "batch_sizes": [1], "iterations": 5, "warmup": 1}
    )
    assert accepted.status_code == 202, accepted.text
    report = wait_for_report(api, accepted.json()["id"])
    assert report["kind"] == "comparison" and report["model_id"] == engines.model_id
    assert report["baseline_engine_id"] == engines.fp32
    rows = {row["engine_id"]: row for row in report["engines"]}
    assert rows[engines.fp32]["speedup_vs_fp32"] == {"1": 1.0}
    assert rows[engines.int8]["speedup_vs_fp32"]["1"] > 0
    assert rows[engines.int8]["latency_ms"]["1"]["p50"] > 0
    assert rows[engines.int8]["accuracy"]["min_cosine"] > 0.9
    assert rows[engines.int8]["engine_bytes"] > 0
    if engines.rtx:
        assert rows[engines.rtx]["measured"] is False
        assert "cannot run on this host" in rows[engines.rtx]["not_run_reason"]
    page = api.get(f"/v1/reports/{report['id']}.html")
    assert page.status_code == 200 and "Engine comparison" in page.text and "speedup vs FP32" in page.text
    png = api.get(f"/v1/reports/{report['id']}.png").content
    assert png.startswith(PNG_SIGNATURE)
    throughput = json.loads(Image.open(io.BytesIO(png)).text[LIMITS_KEY])["throughput"]  # type: ignore[attr-defined]
    fastest = max(row["latency_ms"]["1"]["inferences_per_s"] for row in report["engines"] if row["measured"])
    assert throughput["data"][1] == pytest.approx(fastest, rel=1e-3) and throughput["ylim"][1] > fastest


def test_comparisons_of_different_models_are_400(api: httpx.Client, engines: Engines) -> None:
    other = build_engine(api, upload_model(api, resnet_block_classifier(seed=32), "other.onnx"))
    response = api.post("/v1/reports/comparison", json={"engine_ids": [engines.fp32, other]})
    assert response.status_code == 400 and "different models" in response.json()["error"]["message"]


def test_benchmarking_an_engine_that_cannot_run_here_is_409(api: httpx.Client, engines: Engines) -> None:
    if engines.rtx is None:
        pytest.skip("this host runs TensorRT-RTX engines")
    response = api.post(f"/v1/engines/{engines.rtx}/benchmark", json=BENCH)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "engine_not_runnable_here"


@pytest.mark.parametrize(
    "body",
    [
        {"iterations": 5, "duration_s": 1.0},
        {"batch_sizes": [0]},
        {"batch_sizes": []},
        {"concurrency": 0},
        {"iterations": 5, "colour": "blue"},
    ],
)
def test_bad_benchmark_bodies_are_422(api: httpx.Client, engines: Engines, body: dict[str, object]) -> None:
    response = api.post(f"/v1/engines/{engines.fp32}/benchmark", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


def test_unknown_ids_and_non_report_jobs_are_404(api: httpx.Client, engines: Engines) -> None:
    assert api.get(f"/v1/reports/{'0' * 32}").status_code == 404
    assert api.post(f"/v1/engines/{'0' * 64}/benchmark", json=BENCH).status_code == 404
    build_id = api.get("/v1/builds").json()[0]["id"]
    response = api.get(f"/v1/reports/{build_id}")
    assert response.status_code == 404 and "No report with id" in response.json()["error"]["message"]


def test_reports_are_listed_newest_first_and_filtered_by_kind(api: httpx.Client, engines: Engines) -> None:
    report_id = api.post(f"/v1/engines/{engines.fp32}/benchmark", json={"iterations": 2}).json()["id"]
    wait_for_report(api, report_id)
    listed = api.get("/v1/reports", params={"kind": "benchmark"}).json()
    assert listed[0]["id"] == report_id and {r["kind"] for r in listed} == {"benchmark"}
    assert api.get("/v1/reports", params={"kind": "nonsense"}).status_code == 404
