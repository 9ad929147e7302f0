"""Accuracy through the API: the task named or guessed, targets, loud shortfalls, speed against FP32."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from service.backends.cpu_isa import host_cpu_isa
from tests.api.conftest import build_engine, wait_for_job
from tests.data_factory import npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.trained_models import layout_detector_with_yolo_head, layout_inputs


def test_a_model_carries_the_task_named_on_it(api: httpx.Client) -> None:
    model_id = api.post(
        "/v1/models", files={"file": ("t.onnx", model_bytes(resnet_block_classifier(seed=7)))}
    ).json()["id"]
    assert api.get(f"/v1/models/{model_id}").json()["task"] is None
    task = {"kind": "detection", "detection": {"layout": "channels_last", "score_threshold": 0.3}}
    updated = api.patch(f"/v1/models/{model_id}", json={"task": task})
    assert updated.status_code == 200, updated.text
    stored = api.get(f"/v1/models/{model_id}").json()["task"]
    assert stored["kind"] == "detection" and stored["detection"]["layout"] == "channels_last"
    assert stored["detection"]["score_threshold"] == 0.3
    assert api.patch(f"/v1/models/{model_id}", json={"task": None}).json()["task"] is None


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"task": {"kind": "ocr"}}, 422),
        ({"task": {"kind": "detection", "detection": {"layout": "separate"}}}, 422),
        ({"task": {"kind": "classification"}, "extra": 1}, 422),
    ],
)
def test_bad_tasks_are_rejected(
    api: httpx.Client, classifier: dict[str, str], body: dict[str, Any], status: int
) -> None:
    response = api.patch(f"/v1/models/{classifier['model_id']}", json=body)
    assert response.status_code == status, response.text
    assert api.patch("/v1/models/" + "0" * 64, json={"task": None}).status_code == 404


def test_an_int8_build_leads_with_the_task_metric_and_measures_itself_against_fp32(
    api: httpx.Client, classifier: dict[str, str]
) -> None:
    job = build_engine(
        api,
        model_id=classifier["model_id"],
        precision="int8",
        backend="onnxruntime",
        calibration_set_id=classifier["calibration_set_id"],
        task={"kind": "classification", "top_k": 3},
        accuracy_target={"metric": "top1_agreement", "min": 0.5},
    )
    assert job["target_met"] is True and job["result"]["task"]["kind"] == "classification"
    assert job["result"]["task"]["guessed"] is False
    engine = api.get(f"/v1/engines/{job['engine_id']}").json()
    assert list(engine)[:6] == ["id", "task", "target_met", "int8_share", "warnings", "speed"]
    assert (
        engine["task"]["metrics"]["top1_agreement"] >= 0.5 and "top3_agreement" in engine["task"]["metrics"]
    )
    assert engine["quantization"]["search"]["path"][0]["step"] == "method:entropy"
    assert engine["quantization"]["accuracy_targets"] == [{"metric": "top1_agreement", "min": 0.5}]
    speed = engine["speed"]
    assert speed["int8_ms"] > 0 and speed["fp32_ms"] > 0 and speed["pairs"] >= 3
    assert speed["speedup_vs_fp32"] == pytest.approx(speed["fp32_ms"] / speed["int8_ms"], rel=0.01)
    assert "int8 " in speed["device"]  # the CPU integer class the engine was built for
    assert job["result"]["speedup_vs_fp32"] == speed["speedup_vs_fp32"]
    slower = [w for w in job["warnings"] if "not faster than FP32" in w]
    assert bool(slower) is (speed["speedup_vs_fp32"] <= 1.0)


def test_an_unreachable_target_fails_loudly_not_silently(
    api: httpx.Client, classifier: dict[str, str]
) -> None:
    response = api.post(
        "/v1/quantizations",
        json={**classifier, "target": "onnxruntime", "accuracy_target": {"metric": "snr_db", "min": 200}},
    )
    assert response.status_code == 202, response.text
    job = wait_for_job(api, f"/v1/quantizations/{response.json()['id']}")
    assert job["status"] == "succeeded" and job["target_met"] is False
    assert any("misses the accuracy target" in w and "snr_db" in w for w in job["warnings"])
    assert job["result"]["holdout_seed"] == 0 and job["result"]["search"]["path"][-1]["step"].startswith(
        "keep:"
    )


# Both weight forms where this CPU can run both: 8-bit (VNNI and newer) and the 7-bit weights of
# CPUs whose u8s8 kernels saturate (AVX2), which compute the same integers on every CPU.
_WEIGHT_FORMS = [None] + ([] if host_cpu_isa().u8s8_saturates else ["avx2"])


@pytest.mark.slow
@pytest.mark.parametrize("cpu_isa", _WEIGHT_FORMS, ids=lambda isa: isa or "host")
def test_a_trained_detector_with_a_yolo_head_keeps_its_detections_by_default(
    api: httpx.Client, start_server: Any, cpu_isa: str | None
) -> None:
    """A PicoDet detector ending in a YOLO-style [1, 4 + C, anchors] head; defaults only."""
    if cpu_isa is None:
        _yolo_head_defaults(api)
    else:
        with start_server(cpu_isa=cpu_isa) as forced:
            _yolo_head_defaults(forced)


def _yolo_head_defaults(api: httpx.Client) -> None:
    model = layout_detector_with_yolo_head()
    model_id = api.post("/v1/models", files={"file": ("layout_yolo.onnx", model.SerializeToString())}).json()[
        "id"
    ]
    samples = layout_inputs(20, seed=5)
    uploaded = api.post(
        "/v1/calibration-sets",
        files={"file": ("photos.npz", npz_bytes(image=np.ascontiguousarray(samples)))},
        data={"model_id": model_id},
    )
    assert uploaded.status_code == 201, uploaded.text
    job = build_engine(
        api,
        model_id=model_id,
        precision="int8",
        backend="onnxruntime",
        calibration_set_id=uploaded.json()["id"],
    )
    task = job["result"]["task"]
    assert task["kind"] == "detection" and task["guessed"] is True
    assert task["counts"]["reference_detections"] >= 3
    # The reported failure kept 0 of 4 detections with every report saying cosine 0.99. The bar is
    # the default target (0.85), met on held-out photos with at least 70% of convolutions in INT8.
    recall, precision = task["metrics"]["detection_recall"], task["metrics"]["detection_precision"]
    assert job["target_met"] is True, job["warnings"]
    assert recall >= 0.85 and precision >= 0.85
    assert job["result"]["int8_share"] >= 0.7
    assert not any("misses the accuracy target" in w for w in job["warnings"])


def test_precision_auto_delivers_int8_only_when_it_is_accurate_and_faster(
    api: httpx.Client, classifier: dict[str, str]
) -> None:
    body = {**classifier, "precision": "auto", "backend": "onnxruntime"}
    response = api.post("/v1/builds", json=body)
    assert response.status_code == 202 and response.json()["engine_id"] is None, response.text
    job = wait_for_job(api, f"/v1/builds/{response.json()['id']}")
    assert job["status"] == "succeeded", job
    choice = job["result"]["precision_choice"]
    engine = api.get(f"/v1/engines/{job['engine_id']}").json()
    assert engine["precision"] == choice["chosen"] == job["result"]["precision"]
    # The decision follows INT8's own evidence: its target verdict and its measured speed here.
    int8 = choice["int8"]
    assert int8["speedup_vs_fp32"] is not None and choice["speed_measured"] is True
    int8_wins = int8["target_met"] is not False and int8["speedup_vs_fp32"] > 1.0
    assert choice["chosen"] == ("int8" if int8_wins else "fp32")
    if not int8_wins:
        assert any("precision auto delivers FP32" in w for w in job["warnings"])

    again = api.post("/v1/builds", json=body)
    assert again.status_code == 200, again.text  # the INT8 engine's stored evidence decides it
    assert again.json()["engine_id"] == job["engine_id"]
    assert again.json()["precision_choice"]["chosen"] == choice["chosen"]


def test_precision_auto_falls_back_when_int8_misses_its_target(
    api: httpx.Client, classifier: dict[str, str]
) -> None:
    body = {
        **classifier,
        "precision": "auto",
        "backend": "onnxruntime",
        "accuracy_target": {"metric": "snr_db", "min": 200},
    }
    response = api.post("/v1/builds", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(api, f"/v1/builds/{response.json()['id']}")
    assert job["status"] == "succeeded", job
    assert job["result"]["precision"] == "fp32" and job["target_met"] is True
    assert job["result"]["precision_choice"]["int8"]["target_met"] is False
    assert any("missed its accuracy target" in w for w in job["warnings"])
    assert api.get(f"/v1/engines/{job['engine_id']}").json()["precision"] == "fp32"
    # The INT8 engine it judged stays in the cache: a plain INT8 request is a hit, with its shortfall.
    int8_body = {k: v for k, v in body.items() if k != "precision"} | {"precision": "int8"}
    int8 = api.post("/v1/builds", json=int8_body)
    assert (
        int8.status_code == 200
        and int8.json()["engine_id"] == job["result"]["precision_choice"]["int8"]["engine_id"]
    )


def test_precision_auto_needs_calibration_data_for_an_fp32_model(
    api: httpx.Client, classifier: dict[str, str]
) -> None:
    response = api.post(
        "/v1/builds",
        json={"model_id": classifier["model_id"], "precision": "auto", "backend": "tensorrt-rtx"},
    )
    assert response.status_code == 400
    assert "calibration_set_id" in response.json()["error"]["message"]
    assert "'fp16'" in response.json()["error"]["message"]
