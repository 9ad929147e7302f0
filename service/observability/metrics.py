"""Prometheus metrics for one service instance.

Each :class:`ServiceMetrics` owns its own ``CollectorRegistry`` (never the process-global default), so
several apps in one process (tests, a CLI next to a server) never collide. It exposes:

- ``engine_service_http_requests_total{method, route, status}`` and
  ``engine_service_http_request_duration_seconds{method, route}``: fed by the HTTP middleware through
  :meth:`ServiceMetrics.observe_request`; ``route`` is the route template (``/v1/models/{model_id}``),
  never the raw path, so ids do not explode the label space.
- ``engine_service_jobs{kind, state}``: queued/running/finished job counts, read from the job table at
  scrape time (so they are right across restarts and with several workers sharing a database), and
  ``engine_service_jobs_finished_total{kind, state}`` counted by this process.
- ``engine_service_build_duration_seconds{backend}``: observed from every succeeded ``build`` job.
- ``engine_service_engine_cache_hits_total``, ``..._misses_total`` and ``engine_service_engine_cache_bytes``:
  the builds layer calls :meth:`ServiceMetrics.record_cache_hit` / :meth:`ServiceMetrics.record_cache_miss`
  on each lookup and registers a byte-count callback with :meth:`ServiceMetrics.set_cache_bytes_source`.
- ``engine_service_loaded_runners``: the inference layer registers a callback with
  :meth:`ServiceMetrics.set_loaded_runners_source`.

Callbacks are called at scrape time; one that raises is logged and reported as NaN rather than failing
the whole scrape.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from service.jobs.records import ACTIVE_STATUSES, FINAL_STATUSES, JobRecord, JobStore
from service.jobs.runner import JobTarget

logger = logging.getLogger(__name__)

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Builds on a CPU take seconds; INT8 builds with calibration on large detectors take many minutes.
BUILD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
UNMATCHED_ROUTE = "<unmatched>"


@dataclass(frozen=True)
class MetricsText:
    """One scrape: the exposition body and its Content-Type."""

    body: bytes
    content_type: str


class _JobStateCollector(Collector):
    """Job counts by kind and state, read from the database at scrape time."""

    def __init__(self, store: JobStore) -> None:
        self._store = store

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("engine_service_jobs", "Jobs by kind and state.", labels=["kind", "state"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("engine_service_jobs", "Jobs by kind and state.", labels=["kind", "state"])
        try:
            counts = self._store.counts_by_status()
        except sqlite3.Error:
            logger.exception("could not read job counts for /metrics")
            return
        # Every state of every kind seen, zeros included, so a dashboard's series never vanish.
        for kind in sorted({kind for kind, _ in counts}):
            for state in (*ACTIVE_STATUSES, *FINAL_STATUSES):
                family.add_metric([kind, state], counts.get((kind, state), 0))
        yield family


def _safe(source: Callable[[], float], what: str) -> Callable[[], float]:
    def read() -> float:
        try:
            return float(source())
        except Exception:  # a broken callback must not take the whole scrape down
            logger.exception("the %s metric callback failed", what)
            return math.nan

    return read


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


class ServiceMetrics:
    """The metrics of one service instance, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http_requests = Counter(
            "engine_service_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._http_duration = Histogram(
            "engine_service_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._jobs_finished = Counter(
            "engine_service_jobs_finished",
            "Jobs finished by this process, by kind and final state.",
            ["kind", "state"],
            registry=self.registry,
        )
        self._build_duration = Histogram(
            "engine_service_build_duration_seconds",
            "Duration of succeeded build jobs by backend.",
            ["backend"],
            buckets=BUILD_BUCKETS,
            registry=self.registry,
        )
        self._cache_hits = Counter(
            "engine_service_engine_cache_hits",
            "Engine cache lookups that found an engine.",
            registry=self.registry,
        )
        self._cache_misses = Counter(
            "engine_service_engine_cache_misses",
            "Engine cache lookups that found none.",
            registry=self.registry,
        )
        self._cache_bytes = Gauge(
            "engine_service_engine_cache_bytes", "Bytes held by the engine cache.", registry=self.registry
        )
        self._loaded_runners = Gauge(
            "engine_service_loaded_runners",
            "Engines loaded for inference (warm runners).",
            registry=self.registry,
        )

    # HTTP ---------------------------------------------------------------------------------------

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._http_requests.labels(method, route, str(status)).inc()
        self._http_duration.labels(method, route).observe(seconds)

    # Jobs ---------------------------------------------------------------------------------------

    def track_jobs(self, store: JobStore) -> None:
        """Report job counts by kind and state from ``store`` at scrape time (call once)."""
        self.registry.register(_JobStateCollector(store))

    def observe_job(self, record: JobRecord) -> None:
        """Runner listener: count the finished job; time it when it is a succeeded build."""
        self._jobs_finished.labels(record.kind, record.status).inc()
        if record.kind != "build" or record.status != "succeeded":
            return
        result = record.result or {}
        seconds = result.get("build_seconds")
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            seconds = _seconds_between(record.started_at, record.finished_at)
        if seconds is None or seconds < 0:
            return
        # A build job's params name the backend inside its engine key (read as the queue reads it).
        backend = JobTarget.of(record.params).backend or "unknown"  # unreadable params: still counted
        self._build_duration.labels(str(backend)).observe(float(seconds))

    # Engine cache and runners ---------------------------------------------------------------------

    def record_cache_hit(self) -> None:
        self._cache_hits.inc()

    def record_cache_miss(self) -> None:
        self._cache_misses.inc()

    def set_cache_bytes_source(self, source: Callable[[], float]) -> None:
        """Register the callback that returns the engine cache's size in bytes (read at scrape time)."""
        self._cache_bytes.set_function(_safe(source, "engine cache bytes"))

    def set_loaded_runners_source(self, source: Callable[[], float]) -> None:
        """Register the callback that returns how many engines are loaded for inference."""
        self._loaded_runners.set_function(_safe(source, "loaded runners"))

    # Exposition -----------------------------------------------------------------------------------

    def render(self) -> MetricsText:
        return MetricsText(body=generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)
