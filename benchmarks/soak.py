"""Soak: minutes of mixed load against a real server process, with its memory over time and no 5xx.

A ``serve`` process runs on a fresh data directory (default limits; a small engine cache so that
eviction happens). Client threads then, until the time is up:

* upload models (each new, a few repeated) and calibration sets;
* build INT8 ONNX Runtime engines of those models and follow the jobs to the end;
* run /infer on a warm FP32 engine in JSON and npz;
* run benchmarks on it and follow them;
* send the hostile bodies of issue 11 (decompression bombs, preprocess amplification, huge integers,
  deep nesting, impossible shapes, huge names and graphs, oversized JSON), each of which must be a 4xx;
* list models, engines and builds.

The server's resident memory (itself and any child processes) is sampled every second. Recorded:
requests per kind with their status codes and latency percentiles, the 5xx count (must be 0), the
memory series, its peak and its trend over the second half. Results: ``results/soak.json`` and
``soak.md``. The exit status is 1 when any request got a 5xx or no answer.

    python -m benchmarks.soak --minutes 10
    python -m benchmarks.soak --minutes 1 --results /tmp/soak   # a trial run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks._machine import describe_machine
from benchmarks._soak_inputs import classifier, hostile_requests, npz, samples
from benchmarks._soak_server import SERVER_SETTINGS, Server
from service.backends.cpu_isa import host_cpu_isa

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
FINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Sample:
    kind: str
    status: int  # 0: no answer (connection error or timeout)
    seconds: float


class Recorder:
    """Every request's kind, status and latency, from all client threads."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self.failures: list[str] = []  # 5xx or no answer, with what was sent

    def call(
        self, client: httpx.Client, kind: str, method: str, url: str, **kwargs: Any
    ) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            response = client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            self._add(Sample(kind, 0, time.perf_counter() - start), f"{kind}: {type(exc).__name__}: {exc}")
            return None
        problem = (
            f"{kind}: {response.status_code} {response.text[:300]}" if response.status_code >= 500 else None
        )
        self._add(Sample(kind, response.status_code, time.perf_counter() - start), problem)
        return response

    def _add(self, sample: Sample, problem: str | None) -> None:
        with self._lock:
            self.samples.append(sample)
            if problem:
                self.failures.append(problem)


class Load:
    """The client threads' shared state: the server, what has been stored, and when to stop."""

    def __init__(self, server: Server, recorder: Recorder, seconds: float) -> None:
        self.server = server
        self.recorder = recorder
        self.deadline = time.monotonic() + seconds
        self.model_ids: list[str] = []
        self.set_id = ""
        self.engine_id = ""
        self._seed = 100
        self._lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def next_seed(self) -> int:
        with self._lock:
            self._seed += 1
            return self._seed

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, timeout=300)

    def wait_job(self, client: httpx.Client, path: str, kind: str) -> dict[str, Any] | None:
        while True:
            response = self.recorder.call(client, f"{kind}_poll", "GET", path)
            if response is None or response.status_code != 200:
                return None
            body: dict[str, Any] = response.json()
            if body["status"] in FINAL:
                return body
            time.sleep(0.25)

    def setup(self) -> None:
        """A model, its calibration set and a warm FP32 engine for /infer and benchmarks."""
        with self.client() as client:
            model = client.post("/v1/models", files={"file": ("base.onnx", classifier(1))})
            model.raise_for_status()
            self.model_ids.append(model.json()["id"])
            self.set_id = self._upload_set(client, seed=1, kind="setup")
            self.engine_id = self._build_fp32(client)

    def _upload_set(self, client: httpx.Client, seed: int, kind: str) -> str:
        response = self.recorder.call(
            client,
            kind,
            "POST",
            "/v1/calibration-sets",
            files={"file": ("calib.npz", npz(input=samples(24, seed)))},
            data={"model_id": self.model_ids[0]},
        )
        return response.json()["id"] if response is not None and response.status_code in (200, 201) else ""

    def _build_fp32(self, client: httpx.Client) -> str:
        body = {"model_id": self.model_ids[0], "precision": "fp32", "backend": "onnxruntime"}
        response = self.recorder.call(client, "build_fp32", "POST", "/v1/builds", json=body)
        if response is None or response.status_code not in (200, 202):
            return self.engine_id
        if response.status_code == 202:
            self.wait_job(client, f"/v1/builds/{response.json()['id']}", "build")
        return str(response.json()["engine_id"])

    # ------------------------------------------------------------------ the client loops

    def uploads(self) -> None:
        with self.client() as client:
            while self.running():
                seed = self.next_seed() if random.random() < 0.8 else 101  # some repeats: 200, not 201
                response = self.recorder.call(
                    client,
                    "upload_model",
                    "POST",
                    "/v1/models",
                    files={"file": (f"m{seed}.onnx", classifier(seed))},
                )
                if response is not None and response.status_code in (200, 201):
                    with self._lock:
                        self.model_ids.append(response.json()["id"])
                self._upload_set(client, seed=random.choice([seed, 1]), kind="upload_calibration")
                time.sleep(0.5)

    def builds(self) -> None:
        with self.client() as client:
            while self.running():
                with self._lock:
                    model_id = random.choice(self.model_ids[-20:])
                body = {
                    "model_id": model_id,
                    "precision": "int8",
                    "backend": "onnxruntime",
                    "calibration_set_id": self.set_id,
                    "calibration": {"method": random.choice(["max", "entropy"]), "holdout_fraction": 0.25},
                }
                response = self.recorder.call(client, "build_int8", "POST", "/v1/builds", json=body)
                if response is not None and response.status_code == 202:
                    self.wait_job(client, f"/v1/builds/{response.json()['id']}", "build")

    def inference(self) -> None:
        batch = samples(4, 7)
        with self.client() as client:
            while self.running():
                url = f"/v1/engines/{self.engine_id}/infer"
                if random.random() < 0.5:
                    response = self.recorder.call(
                        client, "infer_json", "POST", url, json={"inputs": {"input": batch[:1].tolist()}}
                    )
                else:
                    response = self.recorder.call(
                        client,
                        "infer_npz",
                        "POST",
                        url,
                        content=npz(input=batch),
                        headers={"content-type": "application/x-npz"},
                    )
                if response is not None and response.status_code == 404:  # evicted: build it again
                    self.engine_id = self._build_fp32(client)

    def benchmarks(self) -> None:
        with self.client() as client:
            while self.running():
                response = self.recorder.call(
                    client,
                    "benchmark",
                    "POST",
                    f"/v1/engines/{self.engine_id}/benchmark",
                    json={"batch_sizes": [1, 4], "iterations": 30, "warmup": 3},
                )
                if response is not None and response.status_code == 202:
                    self.wait_job(client, f"/v1/reports/{response.json()['id']}", "benchmark")
                time.sleep(2)

    def hostile(self) -> None:
        requests = hostile_requests()
        with self.client() as client:
            while self.running():
                for hostile in requests:
                    if not self.running():
                        return
                    self.recorder.call(
                        client, f"hostile_{hostile.name}", "POST", **hostile.request(self.engine_id)
                    )
                    self.recorder.call(
                        client, "list", "GET", random.choice(["/v1/models", "/v1/engines", "/v1/builds"])
                    )
                    time.sleep(0.3)


def sample_memory(
    server: Server, load: Load, series: list[tuple[float, float, float]], every_s: float
) -> None:
    start = time.monotonic()
    while load.running():
        own, total = server.rss_mib()
        series.append((round(time.monotonic() - start, 1), round(own, 1), round(total, 1)))
        time.sleep(every_s)


def run(minutes: float, results: Path, name: str) -> int:
    recorder = Recorder()
    series: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as data:
        server = Server(Path(data))
        try:
            load = Load(server, recorder, seconds=minutes * 60)
            load.setup()
            loops: list[Callable[[], None]] = [
                load.uploads,
                load.builds,
                load.inference,
                load.inference,
                load.benchmarks,
                load.hostile,
            ]
            threads = [threading.Thread(target=loop, name=loop.__name__) for loop in loops]
            threads.append(threading.Thread(target=sample_memory, args=(server, load, series, 1.0)))
            started = time.monotonic()
            load_before = os.getloadavg()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            load_after = os.getloadavg()
            peak = server.peak_mib()
        finally:
            server.stop()
    from benchmarks._soak_report import write_report

    summary = write_report(
        results,
        name,
        recorder.samples,
        recorder.failures,
        series,
        peak_mib=peak,
        seconds=elapsed,
        settings=SERVER_SETTINGS,
        machine=describe_machine(),
        cpu_class=host_cpu_isa().describe(),
        load_average=(load_before, load_after),
    )
    print(json.dumps(summary, indent=2))
    return 1 if recorder.failures else 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--name", default="soak")
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    sys.exit(run(args.minutes, args.results, args.name))


if __name__ == "__main__":
    main()
