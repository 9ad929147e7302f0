"""The Redis-backed job queue against a real redis-server: routing by target, workers, cancellation,
single-flight, restart recovery, shutdown grace and dead workers.

The API side is a JobRunner with a RedisJobQueue (it only dispatches); workers are JobWorkers in
threads (burst mode: they drain their queues and return) or in subprocesses where a test needs real
signals. Each side opens the SQLite file through its own connection, as separate processes would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.errors import BackendUnavailable
from service.jobs.records import JobRecord, JobStore
from service.jobs.runner import SHUTDOWN_REASON, JobContext, JobRunner, JobTarget
from service.store.db import Database

redis = pytest.importorskip("redis", reason="the 'redis' extra (rq, redis) is not installed")
pytest.importorskip("rq", reason="the 'redis' extra (rq, redis) is not installed")

from service.builds.targets import local_targets, targets_from_statuses  # noqa: E402
from service.jobs.redis_queue import GENERIC_QUEUE, RedisJobQueue, queue_name  # noqa: E402
from service.jobs.worker import ABANDONED_REASON, JobWorker  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU = JobTarget("onnxruntime", "1.31.1", "CPU (test, avx2, 2 cores)")
GPU = JobTarget("tensorrt", "10.8.0", "NVIDIA H100 80GB HBM3 (sm_90)", "sm_90")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def queue(redis_url: str) -> RedisJobQueue:
    job_queue = RedisJobQueue.connect(redis_url)
    job_queue.connection.flushdb()
    return job_queue


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "engine_service.db"


def _store(db_path: Path) -> JobStore:
    return JobStore(Database(db_path))


def _double(ctx: JobContext) -> dict[str, Any]:
    ctx.phase("work", 0.5)
    return {"answer": ctx.params["x"] * 2}


def _runner(
    db_path: Path, queue: RedisJobQueue, **handlers: Callable[[JobContext], dict[str, Any]]
) -> JobRunner:
    runner = JobRunner(_store(db_path), queue=queue)
    for kind, handler in {"double": _double, "build": _double, **handlers}.items():
        runner.register(kind, handler)
    return runner


def _build_params(target: JobTarget, x: int) -> dict[str, Any]:
    key = {"backend": target.backend, "backend_version": target.version, "device": target.device}
    if target.compute_capability:
        key["compute_capability"] = target.compute_capability
    return {"key": key, "x": x}


def _drain(worker: JobWorker, timeout: float = 30) -> bool:
    """Run a burst worker in a thread until its queues are empty; True when it ran a job."""
    outcome: list[bool] = []
    thread = threading.Thread(target=lambda: outcome.append(worker.run(burst=True)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the burst worker did not finish"
    return outcome[0]


def _wait_for(
    store: JobStore, job_id: str, predicate: Callable[[JobRecord], bool], timeout: float = 20
) -> JobRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = store.get(job_id)
        if predicate(record):
            return record
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached the expected state: {store.get(job_id)}")


def test_queue_names_keep_backend_and_version_readable_and_hash_the_device() -> None:
    name = queue_name(GPU)
    assert name.startswith("builds:tensorrt:10.8.0:")
    assert queue_name(JobTarget()) == GENERIC_QUEUE
    other_gpu = JobTarget("tensorrt", "10.8.0", "NVIDIA L4 (sm_89)", "sm_89")
    assert queue_name(other_gpu) != name
    assert queue_name(GPU) == name  # stable across processes


def test_a_build_jobs_target_comes_from_its_engine_key() -> None:
    assert JobTarget.of(_build_params(GPU, 1)) == GPU
    assert JobTarget.of({"model_id": "abc"}).is_any
    assert JobTarget.of({"key": {"backend": "onnxruntime"}}).is_any  # incomplete identity: any worker


def test_a_job_submitted_through_redis_is_run_by_a_worker_and_succeeds(
    db_path: Path, queue: RedisJobQueue
) -> None:
    api = _runner(db_path, queue)
    api.start()  # dispatch only: no local threads take jobs
    record, created = api.submit("double", {"x": 21})
    assert created and queue.waiting(JobTarget()) == 1
    time.sleep(0.2)
    assert api.store.get(record.id).status == "queued"  # nobody ran it in the API process

    worker = JobWorker(_runner(db_path, queue), queue, [CPU], name="cpu-worker")
    assert _drain(worker)
    final = api.store.get(record.id)
    assert final.status == "succeeded"
    assert final.result == {"answer": 42}
    assert any("taken by worker cpu-worker" in line for line in final.log_tail())
    assert queue.waiting(JobTarget()) == 0


def test_a_worker_takes_only_the_build_jobs_of_targets_it_can_build(
    db_path: Path, queue: RedisJobQueue
) -> None:
    api = _runner(db_path, queue)
    cpu_job, _ = api.submit("build", _build_params(CPU, 1))
    gpu_job, _ = api.submit("build", _build_params(GPU, 2))
    assert queue.waiting(CPU) == 1 and queue.waiting(GPU) == 1

    gpu_worker = JobWorker(_runner(db_path, queue), queue, [GPU], name="gpu-worker")
    assert _drain(gpu_worker)
    assert api.store.get(gpu_job.id).status == "succeeded"
    assert api.store.get(cpu_job.id).status == "queued"  # not its target: left for another worker
    assert queue.waiting(CPU) == 1

    cpu_worker = JobWorker(_runner(db_path, queue), queue, [CPU], name="cpu-worker")
    assert _drain(cpu_worker)
    cpu_final = api.store.get(cpu_job.id)
    assert cpu_final.status == "succeeded" and cpu_final.result == {"answer": 2}
    assert any("taken by worker cpu-worker" in line for line in cpu_final.log_tail())
    assert any("taken by worker gpu-worker" in line for line in api.store.get(gpu_job.id).log_tail())


def test_a_worker_without_the_generic_queue_leaves_untargeted_jobs_alone(
    db_path: Path, queue: RedisJobQueue
) -> None:
    api = _runner(db_path, queue)
    record, _ = api.submit("double", {"x": 1})
    builds_only = JobWorker(_runner(db_path, queue), queue, [GPU], generic=False, name="builds-only")
    assert builds_only.queue_names == (queue_name(GPU),)
    assert not _drain(builds_only)
    assert api.store.get(record.id).status == "queued"


def test_cancelling_a_running_job_stops_it_on_the_worker(db_path: Path, queue: RedisJobQueue) -> None:
    def loop(ctx: JobContext) -> dict[str, Any]:
        ctx.progress(0.5, "looping")
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)

    api = _runner(db_path, queue, loop=loop)
    record, _ = api.submit("loop", {})
    worker = JobWorker(_runner(db_path, queue, loop=loop), queue, [], name="looper")
    thread = threading.Thread(target=worker.run, kwargs={"burst": True}, daemon=True)
    thread.start()
    _wait_for(api.store, record.id, lambda r: r.status == "running")
    api.cancel(record.id)
    thread.join(20)
    assert not thread.is_alive()
    final = api.store.get(record.id)
    assert final.status == "cancelled"
    assert final.error == "cancelled on request"


def test_cancelling_a_queued_job_removes_it_from_its_redis_queue(db_path: Path, queue: RedisJobQueue) -> None:
    api = _runner(db_path, queue)
    record, _ = api.submit("build", _build_params(GPU, 3))
    assert queue.waiting(GPU) == 1
    cancelled = api.cancel(record.id)
    assert cancelled.status == "cancelled"
    assert queue.waiting(GPU) == 0
    assert not _drain(JobWorker(_runner(db_path, queue), queue, [GPU], name="late-worker"))
    assert api.store.get(record.id).status == "cancelled"


def test_identical_active_jobs_are_queued_in_redis_once(db_path: Path, queue: RedisJobQueue) -> None:
    api = _runner(db_path, queue)
    first, created_first = api.submit("build", _build_params(CPU, 5), dedupe_key="engine-key-1")
    second, created_second = api.submit("build", _build_params(CPU, 5), dedupe_key="engine-key-1")
    assert created_first and not created_second and second.id == first.id
    assert queue.waiting(CPU) == 1
    api.queue.put(first.id, CPU)  # a repeated put (a restart re-queueing it) does not duplicate it
    assert queue.waiting(CPU) == 1
    assert _drain(JobWorker(_runner(db_path, queue), queue, [CPU], name="w"))
    assert api.store.get(first.id).result == {"answer": 10}


def test_a_restarted_api_requeues_what_redis_lost_and_leaves_running_jobs_to_their_workers(
    db_path: Path, queue: RedisJobQueue
) -> None:
    store = _store(db_path)
    waiting, _ = store.create("build", _build_params(CPU, 4), dedupe_key=None, owner=None)
    running, _ = store.create("double", {"x": 1}, dedupe_key=None, owner=None)
    store.mark_running(running.id)  # a worker on another host is building it

    api = _runner(db_path, queue)
    api.start()
    api.start()  # restarting twice queues nothing twice
    assert queue.waiting(CPU) == 1
    assert api.store.get(running.id).status == "running"
    assert _drain(JobWorker(_runner(db_path, queue), queue, [CPU], generic=False, name="w"))
    assert api.store.get(waiting.id).result == {"answer": 8}


def test_submitting_while_redis_is_unreachable_fails_the_row_with_a_clear_message(db_path: Path) -> None:
    no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)  # fail at once instead of after retries
    client = redis.Redis(port=_free_port(), socket_connect_timeout=0.5, retry=no_retry)
    dead = RedisJobQueue(client, url="redis://dead")
    api = JobRunner(_store(db_path), queue=dead)
    api.register("double", _double)
    with pytest.raises(BackendUnavailable, match="Redis at redis://dead is unreachable"):
        api.submit("double", {"x": 1})
    (row,) = api.store.list()
    assert row.status == "failed"  # never a queued row that no worker will see
    assert "unreachable" in (row.error or "")


def test_connecting_to_a_missing_redis_names_the_setting_to_fix() -> None:
    with pytest.raises(BackendUnavailable, match="ENGINE_SERVICE_REDIS_URL"):
        RedisJobQueue.connect(f"redis://:secret@127.0.0.1:{_free_port()}/0?socket_connect_timeout=0.5")
    try:
        RedisJobQueue.connect(f"redis://:secret@127.0.0.1:{_free_port()}/0?socket_connect_timeout=0.5")
    except BackendUnavailable as exc:
        assert "secret" not in exc.message  # the password never reaches messages or logs


def test_worker_targets_are_the_backends_that_can_build_here() -> None:
    from service.backends.registry import backend_statuses

    buildable = {info.name: info for info, ok in backend_statuses() if info is not None and ok.can_build}
    assert "onnxruntime" in buildable  # builds on any CPU
    targets = local_targets()
    assert {target.backend for target in targets} == set(buildable)
    for target in targets:
        info = buildable[target.backend or ""]
        assert (target.version, target.device, target.compute_capability) == (
            info.version, info.device, info.compute_capability
        )  # fmt: skip
    assert {target.backend for target in local_targets(["onnxruntime"])} == {"onnxruntime"}


def test_backends_that_cannot_build_give_no_target() -> None:
    from service.backends.base import Availability, BackendInfo

    info = BackendInfo(name="tensorrt-rtx", version="1.7", device="AOT")
    statuses = [
        (info, Availability(can_build=False, can_run=False, reason="no module")),
        (None, Availability(can_build=False, can_run=False, reason="not installed")),
        (BackendInfo(name="onnxruntime", version="1.31", device="CPU"), Availability(True, True)),
    ]
    assert targets_from_statuses(statuses) == (JobTarget("onnxruntime", "1.31", "CPU"),)


_WORKER_PROCESS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from service.jobs.records import JobStore
    from service.jobs.redis_queue import RedisJobQueue
    from service.jobs.runner import JobRunner, JobTarget
    from service.jobs.worker import JobWorker
    from service.store.db import Database

    db_path, url, name, grace = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    queue = RedisJobQueue.connect(url)
    runner = JobRunner(JobStore(Database(Path(db_path))), queue=queue)

    def loop(ctx):
        ctx.progress(0.5, "looping")
        while True:
            ctx.check_cancelled()
            time.sleep(0.02)

    runner.register("build", loop)
    target = JobTarget("onnxruntime", "1.31.1", "CPU (test, avx2, 2 cores)")
    JobWorker(runner, queue, [target], name=name, grace_seconds=grace, job_monitoring_interval=1).run()
    """
)


@pytest.fixture
def worker_process(
    db_path: Path, redis_url: str
) -> Iterator[Callable[[str, float], subprocess.Popen[bytes]]]:
    """Start `JobWorker.run()` in a subprocess (main thread, real signal handlers)."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, grace: float) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_PROCESS, str(db_path), redis_url, name, str(grace)],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def test_sigterm_gives_the_running_job_its_grace_period_then_fails_it_with_the_shutdown_reason(
    db_path: Path, queue: RedisJobQueue, worker_process: Callable[[str, float], subprocess.Popen[bytes]]
) -> None:
    api = _runner(db_path, queue)
    record, _ = api.submit("build", _build_params(CPU, 1))
    process = worker_process("graceful", 0.5)
    _wait_for(api.store, record.id, lambda r: r.status == "running")
    assert CPU in queue.worker_targets()  # a live worker advertises what it builds
    assert GPU not in queue.worker_targets()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    final = api.store.get(record.id)
    assert final.status == "failed"
    assert final.error == SHUTDOWN_REASON
    assert CPU not in queue.worker_targets()  # it unregistered on the way out


def test_a_job_whose_worker_died_is_failed_by_the_next_workers_maintenance(
    db_path: Path, queue: RedisJobQueue, worker_process: Callable[[str, float], subprocess.Popen[bytes]]
) -> None:
    api = _runner(db_path, queue)
    record, _ = api.submit("build", _build_params(CPU, 1))
    process = worker_process("doomed", 30)
    _wait_for(api.store, record.id, lambda r: r.status == "running")
    process.kill()  # no shutdown path runs: the row is left "running"
    process.wait(timeout=10)
    assert api.store.get(record.id).status == "running"

    survivor = JobWorker(_runner(db_path, queue), queue, [CPU], name="survivor")
    survivor.recover_abandoned()  # within the heartbeat timeout the dead worker's job is not yet abandoned
    assert api.store.get(record.id).status == "running"
    survivor.recover_abandoned(now=time.time() + 3600)  # past it
    final = api.store.get(record.id)
    assert final.status == "failed"
    assert final.error == ABANDONED_REASON


def _cli_env(root: Path, **overrides: str) -> dict[str, str]:
    """Environment for `engine-service` subprocesses: data roots under ``root``, nothing else leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_SERVICE_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        ENGINE_SERVICE_ENGINES_DIR=str(root / "engines"),
        ENGINE_SERVICE_CALIBRATION_DIR=str(root / "calibration_data"),
        ENGINE_SERVICE_MODELS_DIR=str(root / "models"),
        ENGINE_SERVICE_DATABASE_PATH=str(root / "engine_service.db"),
        **overrides,
    )
    return env


def _worker_cli(
    root: Path, env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli.main", "worker", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_worker_command_refuses_to_start_when_the_server_does_not_queue_in_redis(tmp_path: Path) -> None:
    done = _worker_cli(tmp_path, _cli_env(tmp_path, ENGINE_SERVICE_QUEUE_BACKEND="embedded"), "--burst")
    assert done.returncode == 2
    assert "ENGINE_SERVICE_QUEUE_BACKEND is 'embedded'" in done.stderr


def test_the_worker_command_names_the_redis_it_cannot_reach(tmp_path: Path) -> None:
    env = _cli_env(
        tmp_path,
        ENGINE_SERVICE_QUEUE_BACKEND="redis",
        ENGINE_SERVICE_REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0?socket_connect_timeout=0.5",
    )
    done = _worker_cli(tmp_path, env, "--burst")
    assert done.returncode == 2
    assert "Cannot reach Redis" in done.stderr and "ENGINE_SERVICE_REDIS_URL" in done.stderr


def test_the_worker_command_builds_a_real_engine_queued_by_the_api(tmp_path: Path, redis_url: str) -> None:
    from service.builds.requests import BuildRequest
    from service.builds.submit import submit_build
    from service.services import open_services
    from tests.model_factory import resnet_block_classifier
    from tests.server import settings_for

    settings = settings_for(tmp_path, queue_backend="redis", redis_url=redis_url)
    RedisJobQueue.connect(redis_url).connection.flushdb()
    services = open_services(settings)
    try:
        assert isinstance(services.runner.queue, RedisJobQueue)
        model, _ = services.models.add_model(resnet_block_classifier(batch=1), "fixed.onnx", source="upload")
        request = BuildRequest(model_id=model.id, precision="fp32", backend="onnxruntime")
        submission = submit_build(
            request, models=services.models, calibration_sets=services.calibration_sets,
            engines=services.engines, runner=services.runner,
        )  # fmt: skip
        assert submission.job is not None
        job_id = submission.job.id
        env = _cli_env(tmp_path, ENGINE_SERVICE_QUEUE_BACKEND="redis", ENGINE_SERVICE_REDIS_URL=redis_url)
        done = _worker_cli(tmp_path, env, "--burst", "--backend", "onnxruntime", "--name", "cli-worker")
        assert done.returncode == 0, done.stderr
        final = services.jobs.get(job_id)
        assert final.status == "succeeded", final.error
        assert any("taken by worker cli-worker" in line for line in final.log.splitlines())
        engine = services.engines.get(final.result["engine_id"] if final.result else "")
        assert engine.backend == "onnxruntime" and services.engines.read_plan(
            engine.id
        )  # in the shared store
    finally:
        services.close(1)
