"""Serving overhead: POST /v1/engines/{id}/infer (raw tensor bytes) against a direct ONNX Runtime call.

A real uvicorn server process runs the service on loopback with default settings; the script uploads
a model, builds an ``onnxruntime`` FP32 engine through the API, then times, for each batch size, the
same input through

* ``direct``: ``InferenceSession.run`` on the same model, default session options, in this process
  (and ``direct_engine``: the engine bytes the service runs, downloaded and opened the same way);
* ``service``: one ``POST /v1/engines/{id}/infer`` with ``Content-Type: application/x-numpy`` over a
  kept-alive ``http.client`` connection, including sending the body and reading the raw answer.

The two are timed in alternating blocks (``--block`` calls each) so drift on a shared machine hits both alike,
and compared at p50. The target is an overhead of at most 15% at p50. Results, with the machine they
ran on, go to ``benchmarks/results/serving.json`` and ``serving.md``.

Default model: rapidocr's trained PP-OCRv6 text detector at 128x128 (about 12 ms per image on two
cores), a real vision model whose run takes well over 2 ms.

    python benchmarks/serving.py                # defaults: batches 1 and 8, 200 timed calls each
    python benchmarks/serving.py --size 96 --iterations 400
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.reports.benchmark import host_info  # noqa: E402  (needs the repository on sys.path)

TARGET_OVERHEAD = 0.15
SWITCH_PAUSE_S = 0.05
RAW = "application/x-numpy"


@dataclass(frozen=True)
class Timing:
    p50_ms: float
    p90_ms: float
    mean_ms: float
    calls: int


@dataclass(frozen=True)
class BatchComparison:
    """p50s of the three ways of running one batch, and the service's overhead over each direct call."""

    batch_size: int
    input_shape: list[int]
    direct: Timing  # the uploaded model, default session options
    direct_engine: Timing  # the engine bytes the service runs, opened the way its runner opens them
    service: Timing
    overhead_ms: float  # service p50 - direct p50 (the target is judged on this)
    overhead_fraction: float
    serving_overhead_ms: float  # service p50 - direct_engine p50: HTTP, decoding, validation, encoding
    serving_overhead_fraction: float
    target_met: bool


def _timing(samples_ns: list[int]) -> Timing:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p90 = np.percentile(ms, [50, 90])
    return Timing(
        p50_ms=round(float(p50), 4),
        p90_ms=round(float(p90), 4),
        mean_ms=round(float(ms.mean()), 4),
        calls=int(ms.size),
    )


def _default_model() -> Path:
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or spec.origin is None:
        raise SystemExit("rapidocr is not installed; pass --model PATH")
    return Path(spec.origin).parent / "models" / "PP-OCRv6_det_small.onnx"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """The service under uvicorn in a child process, with its data under a temporary directory."""

    def __init__(self, app: str, root: Path) -> None:
        self.port = _free_port()
        env = dict(os.environ)
        env.update(
            {
                "ENGINE_SERVICE_ENGINES_DIR": str(root / "engines"),
                "ENGINE_SERVICE_CALIBRATION_DIR": str(root / "calibration_data"),
                "ENGINE_SERVICE_MODELS_DIR": str(root / "models"),
                "ENGINE_SERVICE_DATABASE_PATH": str(root / "engine_service.db"),
            }
        )
        self.log = (root / "server.log").open("wb")
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.call("GET", "/healthz")[0] == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def json(self, method: str, path: str, payload: Any = None, raw: bytes | None = None) -> Any:
        body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
        kind = "application/octet-stream" if raw is not None else "application/json"
        status, data = self.call(method, path, body, {"content-type": kind})
        if status >= 300:
            raise SystemExit(f"{method} {path} answered {status}: {data[:500]!r}")
        return json.loads(data)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def build_engine(server: Server, model: Path, input_name: str, size: int, max_batch: int) -> str:
    model_id = server.json("POST", f"/v1/models?name={model.name}", raw=model.read_bytes())["id"]
    shape = {"min": [1, 3, size, size], "opt": [1, 3, size, size], "max": [max_batch, 3, size, size]}
    request = {
        "model_id": model_id,
        "precision": "fp32",
        "backend": "onnxruntime",
        "shapes": {input_name: shape},
    }
    accepted = server.json("POST", "/v1/builds", request)
    while accepted.get("cache") == "miss":
        job = server.json("GET", f"/v1/builds/{accepted['id']}")
        if job["status"] == "succeeded":
            break
        if job["status"] in ("failed", "cancelled"):
            raise SystemExit(f"the build {job['status']}: {job.get('error')}")
        time.sleep(0.2)
    return str(accepted["engine_id"])


def compare_batch(
    server: Server, engine_id: str, sessions: tuple[Any, Any], x: np.ndarray, args: argparse.Namespace
) -> BatchComparison:
    session, engine_session = sessions
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    body = x.tobytes()
    headers = {
        "content-type": RAW,
        "x-tensor-dtype": "float32",
        "x-tensor-shape": ",".join(map(str, x.shape)),
    }
    path = f"/v1/engines/{engine_id}/infer"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)

    def via_service() -> np.ndarray:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"infer answered {response.status}: {data[:300]!r}")
        shape = tuple(int(d) for d in response.getheader("x-tensor-shape", "").split(","))
        return np.frombuffer(data, np.float32).reshape(shape)

    def direct() -> np.ndarray:
        return np.asarray(session.run([output_name], {input_name: x})[0])

    def direct_engine() -> np.ndarray:
        return np.asarray(engine_session.run([output_name], {input_name: x})[0])

    calls = {"direct": direct, "direct_engine": direct_engine, "service": via_service}
    reference = direct()
    for call in calls.values():  # the same work on every side
        np.testing.assert_allclose(call(), reference, rtol=1e-3, atol=1e-4)
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[int]] = {name: [] for name in calls}
    blocks = max(args.iterations // args.block, 1)
    for _ in range(blocks):
        for name, call in calls.items():
            # Untimed: a fresh connection (uvicorn drops idle keep-alive connections after 5 s) and a
            # short pause so ONNX Runtime's spinning worker threads of the other side have gone idle.
            connection.close()
            connection.connect()
            time.sleep(SWITCH_PAUSE_S)
            for _ in range(args.block):
                start = time.perf_counter_ns()
                call()
                samples[name].append(time.perf_counter_ns() - start)
    connection.close()
    direct_t, engine_t, service_t = (
        _timing(samples[name]) for name in ("direct", "direct_engine", "service")
    )
    overhead = service_t.p50_ms - direct_t.p50_ms
    serving = service_t.p50_ms - engine_t.p50_ms
    return BatchComparison(
        batch_size=int(x.shape[0]),
        input_shape=list(x.shape),
        direct=direct_t,
        direct_engine=engine_t,
        service=service_t,
        overhead_ms=round(overhead, 4),
        overhead_fraction=round(overhead / direct_t.p50_ms, 4),
        serving_overhead_ms=round(serving, 4),
        serving_overhead_fraction=round(serving / engine_t.p50_ms, 4),
        target_met=overhead / direct_t.p50_ms <= TARGET_OVERHEAD,
    )


def median_run(runs: list[BatchComparison]) -> BatchComparison:
    return sorted(runs, key=lambda run: run.overhead_fraction)[len(runs) // 2]


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        "# Serving overhead: /infer (raw tensor bytes) vs direct ONNX Runtime",
        "",
        f"Model: `{result['model']}`, input {result['input']}, FP32 `onnxruntime` engine built through "
        "the API.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores usable, {machine['platform']}, Python "
        f"{machine['python']}, ONNX Runtime {machine['onnxruntime']}, numpy {machine['numpy']}; 1-minute "
        f"load average {result['load_average_1min']['before']} before, "
        f"{result['load_average_1min']['after']} after (other processes shared the CPU).",
        f"Measured {result['measured_at']}, {result['config']['repeats']} repeats of "
        f"{result['config']['iterations']} timed calls per side and batch "
        f"size in alternating blocks of {result['config']['block']} calls after {result['config']['warmup']} "
        "warm-up calls.",
        "",
        "p50 latency in ms (p90 in parentheses). *Overhead* is the service over the direct call on the "
        "uploaded model (the target: at most 15%); *serving* is the service over the same engine bytes run "
        "directly, i.e. HTTP, decoding, validation, the thread hop and encoding alone.",
        "",
        "| batch | direct (model) | direct (engine) | service /infer | overhead | serving | target |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for row in result["batches"]:
        cells = [
            f"{row[k]['p50_ms']:.2f} ({row[k]['p90_ms']:.2f})" for k in ("direct", "direct_engine", "service")
        ]
        lines.append(
            f"| {row['batch_size']} | {' | '.join(cells)} | {row['overhead_ms']:+.2f} ms "
            f"({row['overhead_fraction']:+.1%}) | {row['serving_overhead_ms']:+.2f} ms "
            f"({row['serving_overhead_fraction']:+.1%}) | {'met' if row['target_met'] else 'missed'} |"
        )
    lines += ["", "Overhead of every repeat (the table shows the median one):", ""]
    for batch, runs in result["repeats"].items():
        values = ", ".join(f"{run['overhead_fraction']:+.1%}" for run in runs)
        lines.append(f"- batch {batch}: {values}")
    lines += ["", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="ONNX model (default: PP-OCRv6 detector)")
    parser.add_argument("--size", type=int, default=128, help="input height and width")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per side and batch size")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--block", type=int, default=10, help="calls per alternating direct/service block")
    parser.add_argument("--repeats", type=int, default=3, help="whole measurements per batch size")
    parser.add_argument("--app", default="service.app:create_app", help="uvicorn app factory")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import onnxruntime

    model = args.model or _default_model()
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    engine_options = onnxruntime.SessionOptions()
    engine_options.graph_optimization_level = (
        onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    )  # as the runner
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch:
        server = Server(args.app, Path(scratch))
        try:
            engine_id = build_engine(server, model, input_name, args.size, max(args.batches))
            status, plan = server.call("GET", f"/v1/engines/{engine_id}/plan")
            if status != 200:
                raise SystemExit(f"downloading the engine answered {status}")
            engine_session = onnxruntime.InferenceSession(
                plan, engine_options, providers=["CPUExecutionProvider"]
            )
            inputs = {
                batch: rng.random((batch, 3, args.size, args.size), dtype=np.float32)
                for batch in args.batches
            }
            runs: dict[int, list[BatchComparison]] = {batch: [] for batch in args.batches}
            for repeat in range(args.repeats):
                for batch, x in inputs.items():
                    runs[batch].append(compare_batch(server, engine_id, (session, engine_session), x, args))
                    logging.info("repeat %d batch %d: %s", repeat, batch, json.dumps(asdict(runs[batch][-1])))
        except BaseException:
            logging.error("server log:\n%s", (Path(scratch) / "server.log").read_text()[-4000:])
            raise
        finally:
            server.stop()
    load_after = os.getloadavg()
    machine = {
        **host_info().to_dict(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    result = {
        "benchmark": "serving overhead: POST /infer (application/x-numpy) vs direct InferenceSession.run",
        "model": model.name,
        "input": f"float32 [N, 3, {args.size}, {args.size}]",
        "machine": machine,
        "config": {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "block": args.block,
            "repeats": args.repeats,
            "batches": args.batches,
            "target_overhead_at_p50": TARGET_OVERHEAD,
        },
        # Per batch size, the repeat with the median overhead; every repeat is kept below it.
        "batches": [asdict(median_run(r)) for r in runs.values()],
        "all_targets_met": all(median_run(r).target_met for r in runs.values()),
        "repeats": {str(batch): [asdict(run) for run in r] for batch, r in runs.items()},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Other processes' load on the machine (1-minute average) before and after: the overhead of
        # thread hand-offs grows with CPU contention, so read the numbers together with it.
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "notes": [
            "service = client-side wall time of one HTTP request on a kept-alive loopback connection "
            "(send body, server decodes, validates, runs the warm runner, encodes, client reads the answer).",
            "direct (model) = InferenceSession.run in the benchmark process with default options on the "
            "uploaded model; direct (engine) = the same on the engine bytes downloaded from the service, "
            "opened as its runner opens them (graph optimizations already applied). All use ONNX Runtime's "
            "default thread count.",
            "Both sides ran in alternating blocks on the same shared machine; other processes may have used "
            "the CPU at the same time.",
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serving.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
