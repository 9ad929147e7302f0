"""Build benchmark: engine build time per backend, model and precision, and the cache-hit latency.

Run: ``.venv/bin/python -m benchmarks.builds [--cache-hit-requests 200 --models ...]``.

Everything goes through the real HTTP API of a real server (uvicorn in a thread, fresh data roots in
a temporary directory): upload the model, upload a calibration set for INT8, ``POST /v1/builds``,
poll the job until it finishes. For each build it records the client's end-to-end time (request to
finished job, which for INT8 on an FP32 model includes calibration, Q/DQ placement and the accuracy
check), the job's own run time, and the backend's build time as the engine record reports it.

Then each built engine is requested again, ``--cache-hit-requests`` times, with the identical body:
every answer must be ``200 {"cache": "hit"}``; the client-side latencies give median, p90 and p99
(the target is a median under 50 ms). Client and server share one process and two cores, so these
latencies include the client's own work and GIL contention with the server thread.

Models:

* ``resnet_block``: ``tests.model_factory.resnet_block_classifier`` (16x16, seeded weights),
  calibrated on 64 generated samples (.npz);
* ``ppocr_cls``: rapidocr's trained text-direction classifier (``[N,3,48,192] -> [N,2]``), batch
  1..8, calibrated on 48 rendered text lines on ``skimage.data`` photo backgrounds (half rotated by
  180 degrees, the two classes it tells apart), preprocessed as rapidocr does (BGR, mean/std 0.5);
  10% of them are held out for the accuracy check;
* ``light_resnet50``: ONNX's backend-test ResNet-50 graph (constant weights, structure only), FP32.

Results: ``benchmarks/results/builds.{json,md}`` with the machine. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks._machine import describe_machine

if TYPE_CHECKING:
    import httpx

RESULTS_DIR = Path(__file__).parent / "results"
POLL_INTERVAL_S = 0.1
BUILD_TIMEOUT_S = 1800.0
# rapidocr's classifier preprocessing (Cls in its config.yaml): 48x192, BGR, x / 255, mean/std 0.5;
# it pads on the right with 0 after normalization (pixel 127.5), here centred with pixel 128.
CLS_PREPROCESS = {
    "size": [48, 192],
    "resize": "letterbox",
    "pad_value": 128,
    "channel_order": "BGR",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}
BACKGROUNDS = ("coffee", "astronaut", "rocket", "brick", "grass", "camera")
WORDS = (
    "engine calibration entropy tensor layer fusion precision histogram threshold detector classifier "
    "kernel latency batch profile scale TensorRT ONNX INT8 FP16 2048 v1.7 Conv ReLU"
)
Matrix = tuple[tuple[str, str], ...]  # (backend, precision)
FULL_MATRIX: Matrix = (
    ("tensorrt-rtx", "fp32"),
    ("tensorrt-rtx", "fp16"),
    ("tensorrt-rtx", "int8"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
)


@dataclass(frozen=True)
class CalibrationUpload:
    filename: str
    data: bytes
    preprocess: dict[str, Any] | None = None


@dataclass(frozen=True)
class BenchModel:
    key: str
    description: str
    onnx_bytes: Callable[[], bytes]
    matrix: Matrix
    calibration: Callable[[], CalibrationUpload] | None = None
    shapes: dict[str, dict[str, list[int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildTiming:
    model: str
    backend: str
    precision: str
    status: str
    end_to_end_s: float
    job_run_s: float | None
    backend_build_s: float | None
    engine_id: str | None
    engine_bytes: int | None
    layer_counts: dict[str, int]
    accuracy: dict[str, Any] | None
    error: str | None


@dataclass(frozen=True)
class CacheHitLatency:
    model: str
    backend: str
    precision: str
    requests: int
    hits: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    latencies_ms: tuple[float, ...]  # every request, in order


# --------------------------------------------------------------------------- models and data


def _resnet_block_bytes() -> bytes:
    from tests.model_factory import model_bytes, resnet_block_classifier

    return model_bytes(resnet_block_classifier())


def _resnet_block_calibration() -> CalibrationUpload:
    from tests.data_factory import classifier_samples, npz_bytes

    return CalibrationUpload("samples.npz", npz_bytes(input=classifier_samples(64, size=16)))


def _ppocr_cls_as_shipped() -> bytes:
    import rapidocr

    return (Path(rapidocr.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_mobile.onnx").read_bytes()


def _ppocr_cls_bytes() -> bytes:
    """The classifier with distinct names for its dynamic input dims.

    As shipped, batch is -1 and height and width are both named "?"; TensorRT reads equal names as
    equal sizes, so no 48x192 profile can satisfy it. Renaming is what a user does before uploading.
    """
    import onnx

    model = onnx.load_from_string(_ppocr_cls_as_shipped())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for index, name in ((0, "batch"), (2, "height"), (3, "width")):
        dims[index].dim_param = name
    return bytes(model.SerializeToString())


def _text_lines(count: int = 48, seed: int = 0) -> CalibrationUpload:
    """Rendered lines of words on lightened photo backgrounds, every other one upside down.

    The classifier decides 0 vs 180 degrees for a detected text line, so it should see text lines:
    DejaVu Sans (shipped with matplotlib), 20 to 40 px, dark ink, backgrounds cut from skimage photos.
    """
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont
    from skimage import data

    font_path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    rng = np.random.default_rng(seed)
    words = WORDS.split()
    backgrounds = [Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB") for name in BACKGROUNDS]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for index in range(count):
            text = " ".join(str(word) for word in rng.choice(words, size=int(rng.integers(2, 5))))
            font = ImageFont.truetype(str(font_path), size=int(rng.integers(20, 41)))
            left, top, right, bottom = font.getbbox(text)
            margin = int(rng.integers(4, 12))
            width, height = int(right - left) + 2 * margin, int(bottom - top) + 2 * margin
            photo = backgrounds[index % len(backgrounds)]
            x0 = int(rng.integers(0, max(1, photo.width - width)))
            y0 = int(rng.integers(0, max(1, photo.height - height)))
            patch = photo.crop((x0, y0, x0 + width, y0 + height))
            line = Image.blend(patch, Image.new("RGB", patch.size, (255, 255, 255)), 0.75)
            ink = tuple(int(v) for v in rng.integers(0, 80, size=3))
            ImageDraw.Draw(line).text((margin - left, margin - top), text, fill=ink, font=font)
            if index % 2:
                line = line.rotate(180)
            encoded = io.BytesIO()
            line.save(encoded, format="PNG")
            archive.writestr(f"lines/{index:03d}.png", encoded.getvalue())
    return CalibrationUpload("text_lines.zip", buffer.getvalue(), CLS_PREPROCESS)


def _light_resnet50_bytes() -> bytes:
    import onnx

    return (Path(onnx.__file__).parent / "backend/test/data/light/light_resnet50.onnx").read_bytes()


MODELS: dict[str, BenchModel] = {
    model.key: model
    for model in (
        BenchModel(
            "resnet_block",
            "model_factory.resnet_block_classifier, input [N,3,16,16]",
            _resnet_block_bytes,
            FULL_MATRIX,
            _resnet_block_calibration,
        ),
        BenchModel(
            "ppocr_cls",
            "rapidocr ch_ppocr_mobile_v2.0_cls (trained), input [1..8,3,48,192]",
            _ppocr_cls_bytes,
            FULL_MATRIX,
            _text_lines,
            shapes={"x": {"min": [1, 3, 48, 192], "opt": [8, 3, 48, 192], "max": [8, 3, 48, 192]}},
        ),
        BenchModel(
            "ppocr_cls_as_shipped",
            "the same classifier with its shipped input dims [-1,3,?,?]",
            _ppocr_cls_as_shipped,
            (("tensorrt-rtx", "fp32"),),
            shapes={"x": {"min": [1, 3, 48, 192], "opt": [8, 3, 48, 192], "max": [8, 3, 48, 192]}},
        ),
        BenchModel(
            "light_resnet50",
            "onnx backend-test light_resnet50 (structural weights), [1,3,224,224]",
            _light_resnet50_bytes,
            (("tensorrt-rtx", "fp32"), ("onnxruntime", "fp32")),
        ),
    )
}


# --------------------------------------------------------------------------- talking to the server


def _checked(response: httpx.Response, *expected: int) -> dict[str, Any]:
    if response.status_code not in expected:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} -> {response.status_code}: "
            f"{response.text[:2000]}"
        )
    body: dict[str, Any] = response.json()
    return body


def upload_model(client: httpx.Client, model: BenchModel) -> str:
    files = {"file": (f"{model.key}.onnx", model.onnx_bytes(), "application/octet-stream")}
    return str(_checked(client.post("/v1/models", files=files, data={"name": model.key}), 200, 201)["id"])


def upload_calibration(client: httpx.Client, model_id: str, upload: CalibrationUpload) -> str:
    form = {"name": upload.filename, "model_id": model_id}
    if upload.preprocess is not None:
        form["preprocess"] = json.dumps(upload.preprocess)
    files = {"file": (upload.filename, upload.data, "application/octet-stream")}
    return str(_checked(client.post("/v1/calibration-sets", files=files, data=form), 200, 201)["id"])


def build_body(
    model: BenchModel, model_id: str, backend: str, precision: str, set_id: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {"model_id": model_id, "backend": backend, "precision": precision}
    if precision == "int8" and set_id is not None:
        body["calibration_set_id"] = set_id
    if model.shapes and backend != "onnxruntime":
        body["shapes"] = model.shapes
    return body


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round(
        (datetime.datetime.fromisoformat(end) - datetime.datetime.fromisoformat(start)).total_seconds(), 3
    )


def timed_build(client: httpx.Client, model: BenchModel, body: dict[str, Any]) -> BuildTiming:
    """POST the build and follow its job to the end; the clock covers request to finished job."""
    started = time.perf_counter()
    accepted = _checked(client.post("/v1/builds", json=body), 200, 202)
    job: dict[str, Any] = {"status": "succeeded", "error": None}
    if accepted["cache"] == "miss":
        deadline = started + BUILD_TIMEOUT_S
        while True:
            job = _checked(client.get(f"/v1/builds/{accepted['id']}"), 200)
            if job["status"] in ("succeeded", "failed", "cancelled") or time.perf_counter() > deadline:
                break
            time.sleep(POLL_INTERVAL_S)
    elapsed = round(time.perf_counter() - started, 3)
    engine: dict[str, Any] = {}
    if job["status"] == "succeeded":
        engine = _checked(client.get(f"/v1/engines/{accepted['engine_id']}"), 200)
    return BuildTiming(
        model=model.key,
        backend=body["backend"],
        precision=body["precision"],
        status=job["status"],
        end_to_end_s=elapsed,
        job_run_s=_seconds_between(job.get("started_at"), job.get("finished_at")),
        backend_build_s=engine.get("build_seconds"),
        engine_id=engine.get("id"),
        engine_bytes=engine.get("engine_bytes"),
        layer_counts=engine.get("layer_counts") or {},
        accuracy=engine.get("accuracy"),
        error=job.get("error"),
    )


def cache_hit_latency(
    client: httpx.Client, timing: BuildTiming, body: dict[str, Any], requests: int
) -> CacheHitLatency:
    """The identical request again and again; each answer must be a cache hit for the same engine."""
    latencies, hits = [], 0
    for _ in range(requests):
        started = time.perf_counter()
        response = client.post("/v1/builds", json=body)
        latencies.append((time.perf_counter() - started) * 1000)
        answer = response.json()
        hits += response.status_code == 200 and answer.get("engine_id") == timing.engine_id
    values = np.asarray(latencies)
    return CacheHitLatency(
        model=timing.model,
        backend=timing.backend,
        precision=timing.precision,
        requests=requests,
        hits=hits,
        median_ms=round(float(np.median(values)), 2),
        p90_ms=round(float(np.percentile(values, 90)), 2),
        p99_ms=round(float(np.percentile(values, 99)), 2),
        max_ms=round(float(values.max()), 2),
        latencies_ms=tuple(round(v, 3) for v in latencies),
    )


# --------------------------------------------------------------------------- report


def markdown_report(payload: dict[str, Any], machine_markdown: str) -> str:
    lines = [
        "# Engine builds through the API",
        "",
        "Each row: `POST /v1/builds` on a fresh server, polled until the job finished. End to end = "
        "request to finished job (INT8 on an FP32 model includes calibration, Q/DQ placement and the "
        "accuracy check); job = the job's own run time; backend = the builder alone (engine record).",
        "",
        "| model | backend | precision | status | end to end s | job s | backend build s | engine KiB "
        "| layers int8/fp16/fp32 | INT8 vs FP32: worst SNR dB, top-1 agreement |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in payload["builds"]:
        counts = row["layer_counts"]
        layers = f"{counts.get('int8', 0)}/{counts.get('fp16', 0)}/{counts.get('fp32', 0)}" if counts else "-"
        snr = _accuracy_summary(row["accuracy"])
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['precision']} | {row['status']} | "
            f"{row['end_to_end_s']:.2f} | {_fmt(row['job_run_s'])} | {_fmt(row['backend_build_s'])} | "
            f"{_fmt(row['engine_bytes'] / 1024 if row['engine_bytes'] else None, 0)} | {layers} | {snr} |"
        )
    failed = [row for row in payload["builds"] if row["status"] != "succeeded"]
    lines += [f"\n- {r['model']} {r['backend']} {r['precision']}: {r['error']}" for r in failed]
    overall = payload["cache_hit_overall"]
    lines += [
        "",
        "## Cache-hit latency of a repeated POST /v1/builds",
        "",
        f"{payload['cache_hit_requests']} identical requests per engine after its build, client-side "
        f"(httpx, keep-alive, same process as the server). All engines together: median "
        f"{overall['median_ms']:.2f} ms, p90 {overall['p90_ms']:.2f} ms, p99 {overall['p99_ms']:.2f} ms "
        f"(target: median under 50 ms).",
        "",
        "| model | backend | precision | hits / requests | median ms | p90 ms | p99 ms | max ms |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in payload["cache_hits"]:
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['precision']} | {row['hits']} / "
            f"{row['requests']} | {row['median_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['max_ms']:.2f} |"
        )
    lines += ["", "## Models", ""] + [f"- {key}: {text}" for key, text in payload["models"].items()]
    lines += ["", "## Machine", "", machine_markdown, ""]
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _accuracy_summary(accuracy: dict[str, Any] | None) -> str:
    """The accuracy check's worst SNR and, for class-like outputs, the lowest top-1 agreement."""
    if not accuracy or not isinstance(accuracy.get("worst_snr_db"), int | float):
        return "-"
    top1 = [o["top1_agreement"] for o in accuracy.get("outputs", []) if o.get("top1_agreement") is not None]
    return f"{accuracy['worst_snr_db']:.1f} dB" + (f", {min(top1):.3f}" if top1 else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("tensorrt-rtx", "onnxruntime"),
        default=["tensorrt-rtx", "onnxruntime"],
    )
    parser.add_argument("--cache-hit-requests", type=int, default=200)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    import logging

    from tests.server import running_server, settings_for

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the client's own per-request log lines
    machine = describe_machine()
    builds: list[BuildTiming] = []
    hits: list[CacheHitLatency] = []
    with (
        tempfile.TemporaryDirectory(prefix="builds-bench-") as root,
        running_server(settings_for(Path(root))) as client,
    ):
        for key in args.models:
            model = MODELS[key]
            model_id = upload_model(client, model)
            needs_set = model.calibration is not None and any(p == "int8" for _, p in model.matrix)
            set_id = (
                upload_calibration(client, model_id, model.calibration())
                if needs_set and model.calibration
                else None
            )
            for backend, precision in model.matrix:
                if backend not in args.backends:
                    continue
                body = build_body(model, model_id, backend, precision, set_id)
                timing = timed_build(client, model, body)
                builds.append(timing)
                sys.stderr.write(
                    f"{key} {backend} {precision}: {timing.status} in {timing.end_to_end_s:.2f} s\n"
                )
                if timing.status == "succeeded" and args.cache_hit_requests > 0:
                    hits.append(cache_hit_latency(client, timing, body, args.cache_hit_requests))
    everything = [asdict(h) for h in hits]
    payload = {
        "benchmark": "builds",
        "models": {key: MODELS[key].description for key in args.models},
        "builds": [asdict(b) for b in builds],
        "cache_hit_requests": args.cache_hit_requests,
        "cache_hits": everything,
        "cache_hit_overall": _overall(hits),
        "machine": machine.to_dict(),
    }
    report = markdown_report(payload, machine.markdown())
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "builds.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.results / "builds.md").write_text(report)
    sys.stdout.write(report)


def _overall(hits: list[CacheHitLatency]) -> dict[str, float]:
    """Percentiles over every engine's requests together (medians of medians would hide the tail)."""
    values = np.asarray([v for h in hits for v in h.latencies_ms])
    if values.size == 0:
        return {"requests": 0, "median_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0}
    return {
        "requests": int(values.size),
        "median_ms": round(float(np.median(values)), 2),
        "p90_ms": round(float(np.percentile(values, 90)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
    }


if __name__ == "__main__":
    main()
