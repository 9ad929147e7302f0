"""Remote build workers end to end: a real API server, a real redis-server, and `engine-service worker
--api-url` in its own process with its own data directory, sharing no file with the API host.

The worker reaches the API host only over HTTP (and Redis), exactly as on a second machine: it claims the
job, downloads the model and calibration set, reports progress and log, builds here and uploads the
engine, which users then download from the API host.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from service.jobs.runner import JobContext
from tests.api.conftest import wait_for_job
from tests.data_factory import classifier_samples
from tests.remote.conftest import WORKER_TOKEN, RemoteSetup, api_host_root, short_lease_server

pytest.importorskip("rq", reason="the 'redis' extra (rq, redis) is not installed")

REPO_ROOT = Path(__file__).resolve().parents[2]


def _worker_env(setup: RemoteSetup, worker_root: Path, **extra: str) -> dict[str, str]:
    """Only what a second host would have: the API URL, the token, Redis, and its own directories."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_SERVICE_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        ENGINE_SERVICE_QUEUE_BACKEND="redis",
        ENGINE_SERVICE_REDIS_URL=setup.settings.redis_url,
        ENGINE_SERVICE_WORKER_TOKEN=WORKER_TOKEN,
        ENGINE_SERVICE_WORKER_CACHE_DIR=str(worker_root / "cache"),
        # Were the worker to open the service database or data roots, it would find them here, empty.
        ENGINE_SERVICE_DATABASE_PATH=str(worker_root / "must-not-exist.db"),
        ENGINE_SERVICE_ENGINES_DIR=str(worker_root / "engines"),
        ENGINE_SERVICE_MODELS_DIR=str(worker_root / "models"),
        ENGINE_SERVICE_CALIBRATION_DIR=str(worker_root / "calibration_data"),
    )
    env.update(extra)
    return env


def _run_worker(
    setup: RemoteSetup, worker_root: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    worker_root.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", "worker", "--burst", *args],
        cwd=worker_root,
        env=_worker_env(setup, worker_root, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _queue_build(setup: RemoteSetup, **request: Any) -> str:
    """POST a build of the classifier that nobody on the API host runs; returns the queued job's id."""
    accepted = setup.api.post(
        "/v1/builds", json={"model_id": setup.model_id, "backend": "onnxruntime", **request}
    )
    assert accepted.status_code == 202, accepted.text
    job_id: str = accepted.json()["id"]
    return job_id


def _wait_for_phase(setup: RemoteSetup, job_id: str, phase: str, *, alive: Any = None) -> None:
    deadline = time.monotonic() + 60
    while setup.api.get(f"/v1/builds/{job_id}").json()["phase"] != phase:
        assert time.monotonic() < deadline, f"the remote worker never reached phase {phase}"
        assert alive is None or alive(), "the remote worker died"
        time.sleep(0.05)


def test_a_remote_worker_builds_an_int8_engine_that_the_api_host_stores_and_serves(
    remote_setup: RemoteSetup, tmp_path: Path
) -> None:
    api = remote_setup.api
    job_id = _queue_build(remote_setup, precision="int8", calibration_set_id=remote_setup.calibration_set_id)
    assert api.get(f"/v1/builds/{job_id}").json()["status"] == "queued"  # the API host runs nothing

    worker_root = tmp_path / "gpu-host"
    done = _run_worker(remote_setup, worker_root, "--api-url", remote_setup.url, "--name", "far-away")
    assert done.returncode == 0, done.stderr[-3000:]

    job = api.get(f"/v1/builds/{job_id}").json()
    assert job["status"] == "succeeded", job
    log = "\n".join(job["log_tail"])
    assert "taken by worker far-away on" in log
    assert "phase: calibrate" in log and "onnxruntime built a" in log
    engine = api.get(f"/v1/engines/{job['engine_id']}").json()
    assert engine["backend"] == "onnxruntime" and engine["precision"] == "int8"
    assert engine["calibration_set_id"] == remote_setup.calibration_set_id
    assert engine["fusion_summary"] is not None and engine["layer_counts"]["total"] > 0
    plan = api.get(f"/v1/engines/{job['engine_id']}/plan")
    assert plan.status_code == 200
    assert hashlib.sha256(plan.content).hexdigest() == engine["plan_sha256"]
    built = api.get(f"/v1/engines/{job['engine_id']}/model.onnx")
    assert hashlib.sha256(built.content).hexdigest() == engine["built_model_id"]
    # Users can run it on the API host as any other engine.
    infer = api.post(
        f"/v1/engines/{job['engine_id']}/infer",
        json={"inputs": {"input": classifier_samples(1).tolist()}},
    )
    assert infer.status_code == 200, infer.text

    # The worker kept its inputs in its own cache and opened no database, engine or model store.
    cached = {path.name for path in (worker_root / "cache").rglob("*")}
    assert f"{remote_setup.model_id}.onnx" in cached and remote_setup.calibration_set_id in cached
    assert not (worker_root / "must-not-exist.db").exists()
    assert not any((worker_root / name).exists() for name in ("engines", "models", "calibration_data"))
    assert not list(api_host_root(remote_setup).rglob("*.tmp*"))


def test_a_remote_worker_refuses_to_start_without_the_token_or_with_a_wrong_one(
    remote_setup: RemoteSetup, tmp_path: Path
) -> None:
    missing = _run_worker(
        remote_setup, tmp_path / "a", "--api-url", remote_setup.url, ENGINE_SERVICE_WORKER_TOKEN=""
    )
    assert missing.returncode == 2
    assert "ENGINE_SERVICE_WORKER_TOKEN" in missing.stderr

    wrong = _run_worker(
        remote_setup, tmp_path / "b", "--api-url", remote_setup.url, ENGINE_SERVICE_WORKER_TOKEN="x" * 40
    )
    assert wrong.returncode == 2
    assert "worker token" in wrong.stderr and "HTTP 401" in wrong.stderr
    assert WORKER_TOKEN not in wrong.stderr + missing.stderr and "x" * 40 not in wrong.stderr


def test_cancelling_a_build_on_the_api_host_stops_it_on_the_remote_worker(
    remote_setup: RemoteSetup, tmp_path: Path
) -> None:
    from service.builds.targets import local_targets
    from service.jobs.redis_queue import RedisJobQueue
    from service.jobs.worker import JobWorker
    from service.remote.client import WorkerApi
    from service.remote.storage import WorkerCache
    from service.remote.worker import remote_executor

    api = remote_setup.api
    job_id = _queue_build(remote_setup, precision="fp32")

    worker_api = WorkerApi(remote_setup.url, WORKER_TOKEN)
    executor = remote_executor(worker_api, WorkerCache(tmp_path / "cache", 10**9))
    polls: list[float] = []

    def endless_build(ctx: JobContext) -> dict[str, Any]:  # stands in for a long build: only cancel ends it
        ctx.phase("build", 0.5)
        while True:
            polls.append(time.monotonic())
            ctx.check_cancelled()
            time.sleep(0.02)

    executor.register("build", endless_build)
    queue = RedisJobQueue.connect(remote_setup.settings.redis_url)
    worker = JobWorker(executor, queue, local_targets(["onnxruntime"]), generic=False, name="cancel-me")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    try:
        _wait_for_phase(remote_setup, job_id, "build")
        assert api.delete(f"/v1/builds/{job_id}").status_code == 200
        final = wait_for_job(api, f"/v1/builds/{job_id}", timeout=60)
    finally:
        thread.join(timeout=60)
        worker_api.close()
    assert final["status"] == "cancelled", final
    assert any("cancelled on request" in line for line in final["log_tail"])
    # The cancel flag is asked for every couple of seconds, not on every check.
    assert len(polls) > 20


def _advertise(redis_url: str, *targets: Any) -> Any:
    """Register a live RQ worker for ``targets`` as a GPU host's `engine-service worker` does at start."""
    from rq.serializers import JSONSerializer
    from rq.worker import Worker

    from service.jobs.redis_queue import RedisJobQueue, queue_name

    queue = RedisJobQueue.connect(redis_url)
    queue.register_targets(targets)
    rq_worker = Worker(
        [queue_name(t) for t in targets], connection=queue.connection, serializer=JSONSerializer
    )
    rq_worker.register_birth()
    return rq_worker


def test_the_api_host_queues_builds_for_backends_only_a_live_remote_worker_can_build(
    remote_setup: RemoteSetup,
) -> None:
    from rq import Queue
    from rq.serializers import JSONSerializer

    from service.backends.registry import get_backend
    from service.jobs.redis_queue import RedisJobQueue, queue_name
    from service.jobs.runner import JobTarget

    if get_backend("tensorrt").available().can_build:
        pytest.skip("this host can build TensorRT itself")
    api = remote_setup.api
    request = {"model_id": remote_setup.model_id, "precision": "fp16", "backend": "tensorrt"}
    nobody = api.post("/v1/builds", json=request)
    assert nobody.status_code == 503, nobody.text
    assert "cannot build here" in nobody.json()["error"]["message"]

    h100 = JobTarget("tensorrt", "10.8.0", "NVIDIA H100 80GB HBM3 (sm_90)", "sm_90")
    l4 = JobTarget("tensorrt", "10.8.0", "NVIDIA L4 (sm_89)", "sm_89")
    hopper_host = _advertise(remote_setup.settings.redis_url, h100)
    try:
        accepted = api.post("/v1/builds", json=request)
        assert accepted.status_code == 202, accepted.text
        job = api.get(f"/v1/builds/{accepted.json()['id']}").json()
        connection = RedisJobQueue.connect(remote_setup.settings.redis_url).connection
        waiting = Queue(queue_name(h100), connection=connection, serializer=JSONSerializer).job_ids
        assert job["id"] in waiting  # in the H100 host's queue, in no other

        ada_host = _advertise(remote_setup.settings.redis_url, l4)
        try:
            ambiguous = api.post("/v1/builds", json={**request, "precision": "fp32"})
            assert ambiguous.status_code == 400
            message = ambiguous.json()["error"]["message"]
            assert "device" in message and "H100" in message and "L4" in message
            chosen = api.post("/v1/builds", json={**request, "precision": "fp32", "device": "sm_89"})
            assert chosen.status_code == 202, chosen.text
            waiting_l4 = Queue(queue_name(l4), connection=connection, serializer=JSONSerializer).job_ids
            assert chosen.json()["id"] in waiting_l4
            unknown = api.post("/v1/builds", json={**request, "device": "A100"})
            assert unknown.status_code == 400 and "A100" in unknown.json()["error"]["message"]
        finally:
            ada_host.register_death()
        for build in (job["id"], chosen.json()["id"]):
            assert api.delete(f"/v1/builds/{build}").json()["status"] == "cancelled"
    finally:
        hopper_host.register_death()


_DOOMED_REMOTE_WORKER = """
import sys, time
from pathlib import Path
from service.jobs.redis_queue import RedisJobQueue
from service.builds.targets import local_targets
from service.jobs.worker import JobWorker
from service.remote.client import WorkerApi
from service.remote.storage import WorkerCache
from service.remote.worker import remote_executor

api_url, redis_url, token, cache = sys.argv[1:5]
executor = remote_executor(WorkerApi(api_url, token), WorkerCache(Path(cache), 10**9))

def endless_build(ctx):
    ctx.phase("build", 0.5)
    while True:
        ctx.check_cancelled()
        time.sleep(0.05)

executor.register("build", endless_build)
queue = RedisJobQueue.connect(redis_url)
JobWorker(executor, queue, local_targets(["onnxruntime"]), generic=False, name="lost-host",
          job_monitoring_interval=1).run()
"""


def test_a_build_whose_remote_host_was_lost_is_failed_through_the_api_by_the_next_worker(
    remote_setup: RemoteSetup, tmp_path: Path
) -> None:
    from service.builds.targets import local_targets
    from service.jobs.redis_queue import RedisJobQueue
    from service.jobs.worker import ABANDONED_REASON, JobWorker
    from service.remote.client import WorkerApi
    from service.remote.storage import WorkerCache
    from service.remote.worker import remote_executor

    api = remote_setup.api
    job_id = _queue_build(remote_setup, precision="fp32", keep=["last"])
    args = [remote_setup.url, remote_setup.settings.redis_url, WORKER_TOKEN, str(tmp_path / "lost-cache")]
    process = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_REMOTE_WORKER, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_phase(remote_setup, job_id, "build", alive=lambda: process.poll() is None)
    finally:
        process.kill()  # the host is gone: nothing of it reports again
        process.wait(timeout=10)
    assert api.get(f"/v1/builds/{job_id}").json()["status"] == "running"

    worker_api = WorkerApi(remote_setup.url, WORKER_TOKEN)
    try:
        survivor = JobWorker(
            remote_executor(worker_api, WorkerCache(tmp_path / "survivor-cache", 10**9)),
            RedisJobQueue.connect(remote_setup.settings.redis_url),
            local_targets(["onnxruntime"]),
            generic=False,
            name="survivor",
        )
        survivor.recover_abandoned(now=time.time() + 3600)  # past the lost host's heartbeat timeout
    finally:
        worker_api.close()
    final = api.get(f"/v1/builds/{job_id}").json()
    assert final["status"] == "failed"
    assert final["error"] == ABANDONED_REASON


def test_build_targets_list_this_hosts_backends_and_the_live_workers(remote_setup: RemoteSetup) -> None:
    from service.jobs.runner import JobTarget

    gpu = JobTarget("tensorrt", "10.8.0", "NVIDIA H100 80GB HBM3 (sm_90)", "sm_90")
    before = remote_setup.api.get("/v1/build-targets").json()
    assert {"onnxruntime"} <= {t["backend"] for t in before if t["built_by"] == "api-host"}
    assert not [t for t in before if t["device"] == gpu.device]
    host = _advertise(remote_setup.settings.redis_url, gpu)
    try:
        during = remote_setup.api.get("/v1/build-targets").json()
    finally:
        host.register_death()
    assert {
        "backend": "tensorrt",
        "version": "10.8.0",
        "device": gpu.device,
        "compute_capability": "sm_90",
        "built_by": "worker",
    } in during
    after = remote_setup.api.get("/v1/build-targets").json()
    assert not [t for t in after if t["device"] == gpu.device]  # a worker that left is no target


def test_an_empty_api_url_or_redis_url_stops_the_worker_instead_of_running_it_locally(
    remote_setup: RemoteSetup, tmp_path: Path
) -> None:
    # compose passes ${ENGINE_SERVICE_API_URL:-} when the variable is unset: never fall back to local mode
    no_url = _run_worker(remote_setup, tmp_path / "a", "--api-url", "")
    assert no_url.returncode == 2 and "--api-url is empty" in no_url.stderr
    no_redis = _run_worker(
        remote_setup, tmp_path / "b", "--api-url", remote_setup.url, ENGINE_SERVICE_REDIS_URL=""
    )
    assert no_redis.returncode == 2 and "ENGINE_SERVICE_REDIS_URL is empty" in no_redis.stderr
    assert not (tmp_path / "a" / "must-not-exist.db").exists()


def test_a_remote_worker_keeps_the_lease_of_a_job_that_reports_nothing_for_longer_than_the_lease(
    tmp_path: Path, redis_url: str
) -> None:
    from service.builds.targets import local_targets
    from service.errors import BadInput
    from service.jobs.redis_queue import RedisJobQueue
    from service.jobs.worker import JobWorker
    from service.remote.client import WorkerApi
    from service.remote.storage import WorkerCache
    from service.remote.worker import remote_executor

    with short_lease_server(tmp_path / "api-host", redis_url) as (api, settings, job_id):
        worker_api = WorkerApi(f"http://{settings.host}:{settings.port}", WORKER_TOKEN)
        executor = remote_executor(worker_api, WorkerCache(tmp_path / "cache", 10**9), heartbeat_s=0.2)

        def silent_build(ctx: JobContext) -> dict[str, Any]:  # like a backend build: minutes without a report
            ends = time.monotonic() + 3.0
            while time.monotonic() < ends:
                ctx.check_cancelled()  # a lost lease would surface here as a cancellation
                time.sleep(0.05)
            raise BadInput("the silent build ran its 3 s")

        executor.register("build", silent_build)
        worker = JobWorker(
            executor, RedisJobQueue.connect(redis_url), local_targets(["onnxruntime"]), generic=False
        )
        try:
            worker.run(burst=True)
        finally:
            worker_api.close()
        final = api.get(f"/v1/builds/{job_id}").json()
    assert final["status"] == "failed"
    assert final["error"] == "the silent build ran its 3 s"  # not lost: the beats kept the lease
