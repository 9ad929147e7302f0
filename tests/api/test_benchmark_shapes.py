"""Benchmarks of engines with dynamic height/width over real HTTP: they measure at a known size or refuse.

Also: a benchmark that measures nothing fails instead of succeeding empty, and every latency report
records whether it held the host alone, the load average and the other jobs running meanwhile.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.api.serving_helpers import build_engine, upload_model, wait_for, wait_for_report
from tests.cli.conftest import invoke, json_of
from tests.data_factory import npz_bytes
from tests.model_factory import resnet_block_classifier

DYNAMIC = resnet_block_classifier(seed=61, spatial=("height", "width"))
BENCH = {"batch_sizes": [1, 2], "iterations": 3, "warmup": 1}


@pytest.fixture(scope="module")
def dynamic_model(api: httpx.Client) -> str:
    return upload_model(api, DYNAMIC, "dynamic-hw.onnx")


@pytest.fixture(scope="module")
def fp32_engine(api: httpx.Client, dynamic_model: str) -> str:
    return build_engine(api, dynamic_model)


def test_a_dynamic_engine_without_a_size_is_refused_naming_its_dynamic_axes(
    api: httpx.Client, fp32_engine: str
) -> None:
    response = api.post(f"/v1/engines/{fp32_engine}/benchmark", json=BENCH)
    assert response.status_code == 400
    error = response.json()["error"]
    assert "axis 2 ('height'), 3 ('width')" in error["message"] and "shapes" in error["message"]
    assert error["details"]["dynamic_axes"] == ["input 'input' axis 2 ('height'), 3 ('width')"]
    assert all(r["params"].get("engine_id") != fp32_engine for r in api.get("/v1/reports").json())


def test_given_shapes_are_measured_and_recorded_with_the_host_conditions(
    api: httpx.Client, fp32_engine: str
) -> None:
    accepted = api.post(
        f"/v1/engines/{fp32_engine}/benchmark", json={**BENCH, "shapes": {"input": [1, 3, 24, 40]}}
    )
    assert accepted.status_code == 202, accepted.text
    report = wait_for_report(api, accepted.json()["id"])
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    assert report["config"]["shapes"] == {"input": [1, 3, 24, 40]}
    conditions = report["conditions"]
    assert conditions["exclusive"] is True and conditions["cores"] >= 1
    assert len(conditions["load_average_start"]) == 3 and len(conditions["load_average_end"]) == 3
    assert isinstance(conditions["other_jobs"], list) and isinstance(conditions["warning"], str)
    page = api.get(f"/v1/reports/{report['id']}.html").text
    assert "load average" in page and "alone among the service's jobs" in page


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"input": [1, 3, 24]}, "has 3 dims, but input 'input' has 4"),
        ({"input": [1, 4, 24, 24]}, "axis 1 is 4, but input 'input' is fixed at 3"),
        ({"input": [1, 3, 0, 24]}, "sizes must be at least 1"),
        ({"image": [1, 3, 24, 24]}, "names 'image', which engine"),
    ],
)
def test_bad_shapes_are_400_with_the_reason(
    api: httpx.Client, fp32_engine: str, shapes: dict[str, list[int]], message: str
) -> None:
    response = api.post(f"/v1/engines/{fp32_engine}/benchmark", json={**BENCH, "shapes": shapes})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_an_int8_engine_is_benchmarked_at_its_calibration_set_size(
    api: httpx.Client, dynamic_model: str
) -> None:
    samples = np.random.default_rng(61).standard_normal((16, 3, 20, 28)).astype(np.float32)
    set_id = api.post(
        "/v1/calibration-sets",
        files={"file": ("set.npz", npz_bytes(input=samples))},
        data={"model_id": dynamic_model},
    ).json()["id"]
    int8 = build_engine(api, dynamic_model, precision="int8", calibration_set_id=set_id)
    report = wait_for_report(api, api.post(f"/v1/engines/{int8}/benchmark", json=BENCH).json()["id"])
    assert report["config"]["shapes"] == {"input": [1, 3, 20, 28]}
    assert len(report["results"]) == 2


def test_a_comparison_of_dynamic_engines_checks_the_sizes_up_front(
    api: httpx.Client, dynamic_model: str, fp32_engine: str
) -> None:
    samples = np.random.default_rng(62).standard_normal((16, 3, 20, 28)).astype(np.float32)
    set_id = api.post(
        "/v1/calibration-sets",
        files={"file": ("set2.npz", npz_bytes(input=samples))},
        data={"model_id": dynamic_model},
    ).json()["id"]
    int8 = build_engine(api, dynamic_model, precision="int8", calibration_set_id=set_id)
    body = {"engine_ids": [fp32_engine, int8], "batch_sizes": [1], "iterations": 3, "warmup": 1}
    refused = api.post("/v1/reports/comparison", json=body)
    assert refused.status_code == 400 and "axis 2 ('height')" in refused.json()["error"]["message"]
    accepted = api.post("/v1/reports/comparison", json={**body, "shapes": {"input": [1, 3, 20, 28]}})
    report = wait_for_report(api, accepted.json()["id"])
    assert all(row["measured"] and row["latency_ms"]["1"]["p50"] > 0 for row in report["engines"])


def test_a_benchmark_that_measures_no_batch_size_fails_instead_of_succeeding_empty(
    api: httpx.Client,
) -> None:
    fixed = build_engine(api, upload_model(api, resnet_block_classifier(seed=63, batch=1), "fixed1.onnx"))
    accepted = api.post(f"/v1/engines/{fixed}/benchmark", json={"batch_sizes": [4, 8], "iterations": 3})
    assert accepted.status_code == 202
    job = wait_for(api, f"/v1/reports/{accepted.json()['id']}")
    assert job["status"] == "failed"
    assert "measured no batch size" in job["error"] and "fixed batch of 1" in job["error"]


def test_the_cli_takes_shape_options(api: httpx.Client, fp32_engine: str) -> None:
    base_url = str(api.base_url).rstrip("/")
    result = invoke(
        "benchmark",
        fp32_engine,
        "--shape",
        "input=1x3x16x16",
        "--iterations",
        "2",
        "--json",
        "--url",
        base_url,
    )
    assert json_of(result)["config"]["shapes"] == {"input": [1, 3, 16, 16]}
    refused = invoke("benchmark", fp32_engine, "--iterations", "2", "--url", base_url)
    assert refused.exit_code == 1 and "axis 2 ('height')" in refused.stderr
    bad = invoke("benchmark", fp32_engine, "--shape", "input=1by3", "--url", base_url)
    assert bad.exit_code == 1 and "NAME=DIMS" in bad.stderr
