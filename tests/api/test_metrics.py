"""Prometheus metrics: request counts by route template, latency, jobs, build durations, cache, runners."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.backends.base import BackendInfo
from service.builds.job_params import BuildJobParams
from service.catalog.engine_keys import BuildConfig, EngineKey
from service.jobs.records import JobRecord, JobStore
from service.observability.metrics import ServiceMetrics
from service.store.db import Database
from tests.auth.probe_routes import PROBE_JOB, RELEASE, probe_server, wait_until_idle
from tests.server import settings_for

KEY = "metrics-scraper-key-" + "m" * 20
AUTH = {"Authorization": f"Bearer {KEY}"}


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _scrape(client: httpx.Client, headers: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return _samples(response.text)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = settings_for(tmp_path_factory.mktemp("metrics"), auth_enabled=True, bootstrap_api_key=KEY)
    RELEASE.set()
    with probe_server(settings) as client:
        try:
            yield client
        finally:
            RELEASE.set()


def test_a_request_is_counted_under_its_route_template(api: httpx.Client) -> None:
    labels = {"method": "GET", "route": "/v1/models/{model_id}", "status": "404"}
    before = _value(_scrape(api), "engine_service_http_requests_total", **labels)
    assert api.get(f"/v1/models/{'e' * 64}").status_code == 404
    assert api.get(f"/v1/models/{'f' * 64}").status_code == 404
    after = _scrape(api)
    assert _value(after, "engine_service_http_requests_total", **labels) == before + 2
    assert not any("e" * 64 in dict(key[1]).get("route", "") for key in after)
    count = _value(
        after,
        "engine_service_http_request_duration_seconds_count",
        method="GET",
        route="/v1/models/{model_id}",
    )
    assert count >= 2


def test_unknown_paths_share_one_label(api: httpx.Client) -> None:
    labels = {"method": "GET", "route": "<unmatched>", "status": "404"}
    before = _value(_scrape(api), "engine_service_http_requests_total", **labels)
    for _ in range(3):
        assert api.get(f"/no/such/{uuid.uuid4().hex}").status_code == 404
    after = _scrape(api)
    assert _value(after, "engine_service_http_requests_total", **labels) == before + 3
    assert not any("/no/such" in dict(key[1]).get("route", "") for key in after)


def test_a_wrong_method_is_counted_under_the_route_it_aimed_at(api: httpx.Client) -> None:
    labels = {"method": "PUT", "route": "/v1/models", "status": "405"}
    before = _value(_scrape(api), "engine_service_http_requests_total", **labels)
    assert api.put("/v1/models").status_code == 405
    assert _value(_scrape(api), "engine_service_http_requests_total", **labels) == before + 1


def test_metrics_need_the_key_when_auth_is_on(secured: httpx.Client) -> None:
    assert secured.get("/metrics").status_code == 401
    assert secured.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200


def test_rejected_requests_are_counted_under_the_route_they_aimed_at(secured: httpx.Client) -> None:
    labels = {"method": "DELETE", "route": "/v1/models/{model_id}", "status": "401"}
    before = _value(_scrape(secured, AUTH), "engine_service_http_requests_total", **labels)
    assert secured.delete(f"/v1/models/{'a' * 64}").status_code == 401
    assert _value(_scrape(secured, AUTH), "engine_service_http_requests_total", **labels) == before + 1


def test_job_gauges_and_finished_counts_follow_the_jobs(secured: httpx.Client) -> None:
    RELEASE.clear()
    try:
        ids = [secured.post("/_test/jobs", headers=AUTH).json()["id"] for _ in range(2)]
        assert len(set(ids)) == 2
        during = _scrape(secured, AUTH)
        active = sum(
            _value(during, "engine_service_jobs", kind=PROBE_JOB, state=state)
            for state in ("queued", "running")
        )
        assert active == 2
    finally:
        RELEASE.set()
    wait_until_idle(secured, AUTH)
    after = _scrape(secured, AUTH)
    assert _value(after, "engine_service_jobs", kind=PROBE_JOB, state="succeeded") >= 2
    assert _value(after, "engine_service_jobs", kind=PROBE_JOB, state="running") == 0
    assert ("engine_service_jobs", frozenset({("kind", PROBE_JOB), ("state", "failed")})) in after
    assert _value(after, "engine_service_jobs_finished_total", kind=PROBE_JOB, state="succeeded") >= 2


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    db = Database(tmp_path / "jobs.db")
    yield JobStore(db)
    db.close()


def _build_params(backend: str) -> dict[str, Any]:
    """A build job's params as submit writes them: the backend is named inside the engine key."""
    key = EngineKey("a" * 64, BuildConfig(precision="fp32"), None, BackendInfo(backend, "1.0", "cpu"))
    return BuildJobParams(key=key).to_json()


def _finished(
    jobs: JobStore, kind: str, status: str, result: dict | None, params: dict | None = None
) -> JobRecord:  # type: ignore[type-arg]
    record, _ = jobs.create(kind, params or {}, dedupe_key=None, owner=None)
    jobs.mark_running(record.id)
    jobs.finish(record.id, status, result=result)  # type: ignore[arg-type]
    return jobs.get(record.id)


def test_build_durations_come_from_succeeded_build_jobs(jobs: JobStore) -> None:
    metrics = ServiceMetrics()
    metrics.observe_job(
        _finished(jobs, "build", "succeeded", {"build_seconds": 2.5}, _build_params("tensorrt-rtx"))
    )
    metrics.observe_job(
        _finished(jobs, "build", "succeeded", {"engine_id": "x"}, _build_params("onnxruntime"))
    )
    metrics.observe_job(_finished(jobs, "build", "failed", None, _build_params("tensorrt-rtx")))
    metrics.observe_job(_finished(jobs, "quantization", "succeeded", {"build_seconds": 99.0}))
    samples = _samples(metrics.render().body.decode())
    assert _value(samples, "engine_service_build_duration_seconds_count", backend="tensorrt-rtx") == 1
    assert _value(samples, "engine_service_build_duration_seconds_sum", backend="tensorrt-rtx") == 2.5
    # No build_seconds in the result: timed from the job's own start and finish stamps.
    assert _value(samples, "engine_service_build_duration_seconds_count", backend="onnxruntime") == 1
    assert 0 <= _value(samples, "engine_service_build_duration_seconds_sum", backend="onnxruntime") < 60
    assert _value(samples, "engine_service_jobs_finished_total", kind="build", state="failed") == 1
    assert _value(samples, "engine_service_jobs_finished_total", kind="quantization", state="succeeded") == 1


def test_a_build_job_is_timed_under_the_backend_its_engine_key_names(jobs: JobStore) -> None:
    key = EngineKey(
        "a" * 64, BuildConfig(precision="fp32"), None, BackendInfo("onnxruntime", "1.31.0", "cpu")
    )
    record, _ = jobs.create("build", BuildJobParams(key=key).to_json(), dedupe_key=None, owner=None)
    jobs.mark_running(record.id)
    jobs.finish(
        record.id, "succeeded", result={"engine_id": key.digest, "cache": "miss", "build_seconds": 1.5}
    )
    metrics = ServiceMetrics()
    metrics.observe_job(jobs.get(record.id))
    samples = _samples(metrics.render().body.decode())
    assert _value(samples, "engine_service_build_duration_seconds_sum", backend="onnxruntime") == 1.5


def test_cache_counters_and_callback_gauges_are_read_at_scrape_time() -> None:
    metrics = ServiceMetrics()
    cache_bytes = [1024]
    metrics.set_cache_bytes_source(lambda: cache_bytes[0])
    metrics.set_loaded_runners_source(lambda: 3)
    for _ in range(2):
        metrics.record_cache_hit()
    metrics.record_cache_miss()
    cache_bytes[0] = 4096
    samples = _samples(metrics.render().body.decode())
    assert _value(samples, "engine_service_engine_cache_hits_total") == 2
    assert _value(samples, "engine_service_engine_cache_misses_total") == 1
    assert _value(samples, "engine_service_engine_cache_bytes") == 4096
    assert _value(samples, "engine_service_loaded_runners") == 3


def test_a_failing_callback_reads_nan_without_breaking_the_scrape() -> None:
    metrics = ServiceMetrics()

    def broken() -> float:
        raise OSError("cache directory vanished")

    metrics.set_cache_bytes_source(broken)
    metrics.record_cache_hit()
    samples = _samples(metrics.render().body.decode())
    assert math.isnan(_value(samples, "engine_service_engine_cache_bytes"))
    assert _value(samples, "engine_service_engine_cache_hits_total") == 1


def test_two_instances_in_one_process_keep_separate_registries() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    first.observe_request("GET", "/healthz", 200, 0.01)
    first_samples = _samples(first.render().body.decode())
    second_samples = _samples(second.render().body.decode())
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert _value(first_samples, "engine_service_http_requests_total", **labels) == 1
    assert _value(second_samples, "engine_service_http_requests_total", **labels) == 0
