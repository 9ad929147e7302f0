"""Entropy calibration benchmark: the service vs ONNX Runtime's ``quantize_static``, side by side.

Run: ``.venv/bin/python -m benchmarks.calibration [--size 640 --calibration-images 8 ...]``.

On the trained PP-OCR text detector shipped by ``rapidocr`` and real photos from ``skimage.data``
(including the ``page``, ``text`` and ``logo`` images, which contain text), each side turns the FP32
model into an INT8 Q/DQ model with entropy calibration on the same calibration images, in its own
subprocess, so its wall time and peak RSS (``wait4`` rusage of that child) are its own:

* ``ours``: the images are ingested as an image calibration set (``ingest_calibration_upload``)
  and quantized by ``quantize_model`` with method ``entropy``, batched as a build job batches them.
* ``ort-default``: ``quantize_static`` as shipped (QDQ, per-channel symmetric INT8 weights,
  symmetric INT8 activations, ``CalibrationMethod.Entropy``, every op type). ``quantize_static``
  cannot pass histogram sizes to the entropy calibrator, so it runs with 128 bins and 128 quantized
  bins, where the KL search has a single candidate and the threshold is the observed maximum.
* ``ort-tuned``: the same settings, but with a fair entropy search (2048 bins, 128 quantized bins,
  TensorRT's numbers, set through ``create_calibrator``, the function ``quantize_static`` calls, whose
  ranges then reach ``quantize_static`` through its calibration cache) and only Conv/ConvTranspose
  quantized, the placement closest to the service's (which also leaves fewer tensors to calibrate).

Every INT8 model is then compared with FP32 on held-out images that no side calibrated on: cosine,
SNR and max abs error of the probability map, and the detector's own decision (pixels over the 0.3
threshold PP-OCR binarizes at): pixel agreement and IoU with FP32. Each model's latency on the ONNX
Runtime CPU provider is measured too. Results go to ``benchmarks/results/calibration.{json,md}``
with the machine. Nothing here asserts on time; the numbers are recorded, not judged.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks._machine import describe_machine

if TYPE_CHECKING:
    from service.datasets.preprocess import PreprocessSpec

RESULTS_DIR = Path(__file__).parent / "results"
DETECTOR = "PP-OCRv6_det_small.onnx"
# The detector's own binarization threshold (rapidocr's Det.thresh, PP-OCR's DBPostProcess).
PROBABILITY_THRESHOLD = 0.3
# Calibration and held-out photos never overlap; both lists put text-bearing images early.
CALIBRATION_POOL = (
    "page",
    "astronaut",
    "coffee",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "brick",
    "grass",
    "gravel",
    "moon",
    "cell",
)
HOLDOUT_POOL = ("text", "logo", "chelsea", "coins", "clock")
SIDES = ("ours", "ort-default", "ort-tuned")
# rapidocr's detector preprocessing: BGR, x / 255, mean 0.5, std 0.5. The aspect ratio is kept by
# letterboxing onto a mid-grey canvas, which normalizes to about 0, as the network saw in training.
PREPROCESS = {
    "resize": "letterbox",
    "pad_value": 128,
    "channel_order": "BGR",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}


@dataclass(frozen=True)
class SideRun:
    """One side's quantization run, as measured from outside (wall, peak RSS) and inside (phases)."""

    side: str
    wall_s: float
    cpu_s: float  # user + system: less sensitive than wall time to other work on a shared machine
    peak_rss_mib: float
    baseline_rss_mib: float
    wall_runs_s: tuple[float, ...]
    cpu_runs_s: tuple[float, ...]
    peak_rss_runs_mib: tuple[float, ...]
    phases_s: dict[str, float]
    model_path: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class OutputAccuracy:
    """INT8 vs FP32 on every held-out image, the probability map flattened over all of them."""

    cosine: float
    snr_db: float
    max_abs_error: float
    mean_abs_error: float
    pixel_agreement: float
    iou: float
    per_image_iou: tuple[float, ...]
    fp32_positive_fraction: float


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int


@dataclass(frozen=True)
class ModelEvaluation:
    side: str
    quantize_linear_nodes: int
    accuracy: OutputAccuracy | None  # None for the FP32 reference
    latency: LatencyStats


def detector_path() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models" / DETECTOR


def preprocess_spec(size: int) -> PreprocessSpec:
    from service.datasets.preprocess import PreprocessSpec

    return PreprocessSpec.model_validate({"size": [size, size], **PREPROCESS})


def photo_png(name: str) -> bytes:
    """A skimage.data image as lossless PNG bytes (grey and RGBA become RGB), at full resolution."""
    from PIL import Image
    from skimage import data

    pixels = np.asarray(getattr(data, name)())
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[..., :3])).save(buffer, format="PNG")
    return buffer.getvalue()


def write_archive(path: Path, names: tuple[str, ...]) -> None:
    """A zip of the photos, named so that archive order is the order given."""
    with zipfile.ZipFile(path, "w") as archive:
        for index, name in enumerate(names):
            archive.writestr(f"{index:03d}_{name}.png", photo_png(name))


def archive_samples(path: Path, size: int) -> Iterator[np.ndarray]:
    """Each archive image preprocessed exactly as the service preprocesses it, as a [1,3,H,W] batch."""
    from service.datasets.preprocess import image_to_array

    spec = preprocess_spec(size)
    with zipfile.ZipFile(path) as archive:
        for member in sorted(archive.namelist()):
            yield image_to_array(archive.read(member), spec, name=member)[np.newaxis]


# --------------------------------------------------------------------------- workers (subprocesses)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_ours(job: dict[str, Any], phases: dict[str, float]) -> dict[str, Any]:
    """Ingest the calibration images as a set, then ``quantize_model`` with method entropy."""
    import onnx

    from service.datasets.ingest import ingest_calibration_upload
    from service.datasets.storage import CalibrationSet, bind_to_model
    from service.onnx_graph.inspect import model_inputs
    from service.quantize.inputs import calibration_inputs
    from service.quantize.pipeline import QuantizationPlan, quantize_model

    workdir = Path(job["workdir"])
    clock = _PhaseClock(phases)
    model = onnx.load(job["model"])
    inputs = model_inputs(model)
    clock.mark("load_model")
    info = ingest_calibration_upload(
        Path(job["calibration_zip"]),
        "calibration.zip",
        workdir / f"{job['name']}-set",
        preprocess=preprocess_spec(job["size"]),
        max_members=10_000,
        max_uncompressed_bytes=2**34,
    )
    dataset = CalibrationSet.open(workdir / f"{job['name']}-set")
    binding = bind_to_model(info, inputs)
    data = calibration_inputs(inputs, dataset, binding, holdout_fraction=0.0, need_holdout=False)
    # A build job batches as calibration_inputs says; a given batch_size profiles the memory/speed trade-off.
    batch_size = int(job["batch_size"]) or data.batch_size

    def rebatched() -> Iterator[dict[str, np.ndarray]]:
        return dataset.batches(batch_size, stop=data.calibration_samples, bind=binding)

    batches = data.calibration if batch_size == data.batch_size else rebatched
    clock.mark("ingest")
    outcome = quantize_model(
        model,
        batches,
        data.calibration_samples,
        None,
        QuantizationPlan(method="entropy"),
        progress=lambda _fraction, phase: clock.mark(_OUR_PHASES[phase]) if phase in _OUR_PHASES else None,
    )
    clock.mark("cache_and_outcome")
    onnx.save(outcome.qdq_model, job["output"])
    clock.mark("save")
    return {
        "batch_size": batch_size,
        "calibrated_tensors": len(outcome.activation_amax),
        "quantized_nodes": len(outcome.quantized_nodes),
        "samples": data.calibration_samples,
    }


# quantize_model announces a phase when it starts; the time until then belongs to the phase before.
_OUR_PHASES = {
    "calibrate": "quantize_setup",
    "evaluate": "collect_histograms",
    "finalize": "thresholds_and_qdq",
}


def run_ort(job: dict[str, Any], phases: dict[str, float]) -> dict[str, Any]:
    """ONNX Runtime's quantize_static with its entropy calibrator (see the module docstring)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    tuned = job["side"] == "ort-tuned"
    clock = _PhaseClock(phases)
    # quantize_static keeps the model's opset; at opset 11 its per-channel DequantizeLinear (axis
    # attribute, opset 13) makes a model ONNX Runtime refuses to load, so the peer upgrades first,
    # as the service does inside quantize_model.
    model_path = str(Path(job["workdir"]) / f"{job['name']}-opset13.onnx")
    onnx.save(onnx.version_converter.convert_version(onnx.load(job["model"]), 13), model_path)
    clock.mark("opset13_upgrade")
    reader = _ort_reader(Path(job["calibration_zip"]), job["size"])
    op_types = ["Conv", "ConvTranspose"] if tuned else None
    options = {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True}
    common: dict[str, Any] = dict(
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Entropy,
        extra_options=options,
    )
    if not tuned:
        quantize_static(model_path, job["output"], reader, **common)
        clock.mark("quantize_static")
        return {"num_bins": 128, "num_quantized_bins": 128, "op_types_to_quantize": "all", **options}
    cache = Path(job["workdir"]) / f"{job['name']}-ranges.json"
    with tempfile.TemporaryDirectory(prefix="ort-calib-") as scratch:
        calibrator = create_calibrator(
            Path(model_path),
            op_types,
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128},
        )
        clock.mark("create_calibrator")
        calibrator.collect_data(reader)
        clock.mark("collect_data")
        ranges = calibrator.compute_data()
        clock.mark("compute_data_kl_search")
        save_tensors_data(ranges, cache)
        del calibrator
    quantize_static(model_path, job["output"], None, calibration_cache_path=cache, **common)
    clock.mark("quantize_static_from_ranges")
    return {
        "num_bins": 2048,
        "num_quantized_bins": 128,
        "op_types_to_quantize": op_types,
        "calibrated_tensors": len(ranges.data),
        **options,
    }


def _ort_reader(archive: Path, size: int) -> Any:
    """A CalibrationDataReader that decodes and preprocesses one image per ``get_next``."""
    from onnxruntime.quantization import CalibrationDataReader

    class ImageReader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._samples = archive_samples(archive, size)

        def get_next(self) -> dict[str, np.ndarray] | None:
            sample = next(self._samples, None)
            return None if sample is None else {"x": sample}

    return ImageReader()


class _PhaseClock:
    """Records the seconds since the previous mark under each mark's name."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases = phases
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self.last, 3)
        self.last = now


def worker_main(job_path: Path) -> None:
    """Entry point of a side's subprocess: run the job, write ``<job>.result.json``."""
    job = json.loads(job_path.read_text())
    # Import what the side imports anyway, so the baseline is the interpreter plus its libraries.
    import onnx  # noqa: F401
    import onnxruntime

    if job["side"].startswith("ours"):
        import service.quantize.pipeline  # noqa: F401
    else:
        import onnxruntime.quantization  # noqa: F401
    baseline = _rss_mib()
    phases: dict[str, float] = {}
    runner: Callable[[dict[str, Any], dict[str, float]], dict[str, Any]] = (
        run_ours if job["side"].startswith("ours") else run_ort
    )
    settings = runner(job, phases)
    result = {"baseline_rss_mib": baseline, "phases_s": phases, "settings": settings}
    job_path.with_suffix(".result.json").write_text(json.dumps(result, default=str))


# --------------------------------------------------------------------------- parent: run, evaluate, record


def run_side(side: str, job: dict[str, Any], workdir: Path, repeats: int) -> SideRun:
    """Run one side ``repeats`` times, each in a fresh interpreter whose own ``ru_maxrss`` is its peak.

    Wall and CPU time are the medians over the repeats (the machine may be shared), peak RSS the
    largest; the INT8 model and the phases are the last repeat's (every repeat computes the same).
    """
    walls, cpus, peaks = [], [], []
    result: dict[str, Any] = {}
    for repeat in range(repeats):
        name = f"{side}-{repeat}"
        job_path = workdir / f"{name}.job.json"
        job_path.write_text(
            json.dumps({**job, "side": side, "name": name, "output": str(workdir / f"{side}-int8.onnx")})
        )
        with open(workdir / f"{name}.log", "wb") as log:
            started = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.calibration", "--worker", str(job_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).parent.parent,
            )
            _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
            walls.append(time.perf_counter() - started)
        if os.waitstatus_to_exitcode(status) != 0:
            tail = (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"side '{side}' failed (status {status}):\n{tail}")
        cpus.append(usage.ru_utime + usage.ru_stime)
        peaks.append(usage.ru_maxrss / 1024)
        result = json.loads(job_path.with_suffix(".result.json").read_text())
    return SideRun(
        side=side,
        wall_s=round(float(np.median(walls)), 2),
        cpu_s=round(float(np.median(cpus)), 2),
        peak_rss_mib=round(max(peaks), 1),
        baseline_rss_mib=round(result["baseline_rss_mib"], 1),
        wall_runs_s=tuple(round(v, 2) for v in walls),
        cpu_runs_s=tuple(round(v, 2) for v in cpus),
        peak_rss_runs_mib=tuple(round(v, 1) for v in peaks),
        phases_s=result["phases_s"],
        model_path=str(workdir / f"{side}-int8.onnx"),
        settings=result["settings"],
    )


def _session(path: str) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def accuracy_against(reference: list[np.ndarray], candidate: list[np.ndarray]) -> OutputAccuracy:
    """Numeric and task agreement of ``candidate`` probability maps with the FP32 ``reference``."""
    ref = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    got = np.concatenate([c.ravel() for c in candidate]).astype(np.float64)
    error = got - ref
    noise = float(np.sum(error**2))
    cosine = float(np.dot(ref, got) / max(np.linalg.norm(ref) * np.linalg.norm(got), 1e-30))
    ref_on, got_on = ref > PROBABILITY_THRESHOLD, got > PROBABILITY_THRESHOLD
    union = int(np.sum(ref_on | got_on))
    per_image = []
    for r, c in zip(reference, candidate, strict=True):
        r_on, c_on = r > PROBABILITY_THRESHOLD, c > PROBABILITY_THRESHOLD
        image_union = int(np.sum(r_on | c_on))
        per_image.append(round(float(np.sum(r_on & c_on)) / image_union, 4) if image_union else 1.0)
    return OutputAccuracy(
        cosine=round(cosine, 6),
        snr_db=round(10 * np.log10(float(np.sum(ref**2)) / noise), 2) if noise > 0 else float("inf"),
        max_abs_error=round(float(np.max(np.abs(error))), 5),
        mean_abs_error=round(float(np.mean(np.abs(error))), 6),
        pixel_agreement=round(float(np.mean(ref_on == got_on)), 6),
        iou=round(float(np.sum(ref_on & got_on)) / union, 4) if union else 1.0,
        per_image_iou=tuple(per_image),
        fp32_positive_fraction=round(float(np.mean(ref_on)), 5),
    )


def latency_stats(times_ms: list[float]) -> LatencyStats:
    values = np.asarray(times_ms)
    return LatencyStats(
        round(float(np.median(values)), 1),
        round(float(np.percentile(values, 90)), 1),
        round(float(values.min()), 1),
        len(times_ms),
    )


def evaluate(models: dict[str, str], holdout: list[np.ndarray], latency_runs: int) -> list[ModelEvaluation]:
    """Accuracy of each INT8 model against the FP32 reference (``models["fp32"]``), and latencies.

    Latency runs go round-robin over the models (one run of each per round), so a burst of other
    work on a shared machine slows every model alike instead of whichever was being measured.
    """
    import onnx

    sessions = {side: _session(path) for side, path in models.items()}
    outputs = {side: [session.run(None, {"x": x})[0] for x in holdout] for side, session in sessions.items()}
    times: dict[str, list[float]] = {side: [] for side in sessions}
    for session in sessions.values():  # warm-up: first runs allocate and pick kernels
        for _ in range(2):
            session.run(None, {"x": holdout[0]})
    for _ in range(latency_runs):
        for side, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {"x": holdout[0]})
            times[side].append((time.perf_counter() - started) * 1000)
    return [
        ModelEvaluation(
            side=side,
            quantize_linear_nodes=sum(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node),
            accuracy=None if side == "fp32" else accuracy_against(outputs["fp32"], outputs[side]),
            latency=latency_stats(times[side]),
        )
        for side, path in models.items()
    ]


def markdown_report(payload: dict[str, Any], machine_markdown: str) -> str:
    runs = {run["side"]: run for run in payload["runs"]}
    evals = {item["side"]: item for item in payload["evaluations"]}
    fp32_ms = evals["fp32"]["latency"]["median_ms"]
    lines = [
        "# Entropy calibration: service vs ONNX Runtime quantize_static",
        "",
        f"Model: `{DETECTOR}` (trained, rapidocr {payload['rapidocr']}), input {payload['size']}x"
        f"{payload['size']}. Calibration: {len(payload['calibration_images'])} photos "
        f"({', '.join(payload['calibration_images'])}); held out: {', '.join(payload['holdout_images'])}.",
        f"Each side ran {payload['repeats']} time(s), each in its own subprocess: wall and CPU (user + "
        "system) time of the whole process (medians), peak RSS its `ru_maxrss` (largest), baseline its "
        "RSS after importing its libraries. Accuracy: INT8 vs FP32 "
        f"probability maps on the held-out photos; IoU and agreement of the pixels over "
        f"{PROBABILITY_THRESHOLD}. Latency: ONNX Runtime CPU provider, batch 1, median of "
        f"{payload['latency_runs']} runs, round-robin over the models. Load average (1, 5, 15 min) "
        f"before / after: {payload['load_average']['before']} / {payload['load_average']['after']}.",
        "",
        "| side | wall s | CPU s | peak RSS MiB | baseline MiB | cosine | SNR dB | max abs err | IoU@0.3 "
        "| pixel agreement | Q nodes | latency ms (x FP32) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for side in payload["sides"]:
        run, acc, lat = runs[side], evals[side]["accuracy"], evals[side]["latency"]
        lines.append(
            f"| {side} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | {run['peak_rss_mib']:.0f} | "
            f"{run['baseline_rss_mib']:.0f} | {acc['cosine']:.5f} | {acc['snr_db']:.2f} | "
            f"{acc['max_abs_error']:.4f} | {acc['iou']:.4f} | {acc['pixel_agreement']:.5f} | "
            f"{evals[side]['quantize_linear_nodes']} | "
            f"{lat['median_ms']:.0f} ({lat['median_ms'] / fp32_ms:.2f}x) |"
        )
    lines += [
        "",
        f"FP32 latency: {fp32_ms:.0f} ms median.",
        "",
        "## Ratios (peer / ours)",
        "",
        "| ours | peer | wall time | CPU time | peak RSS | RSS above baseline | SNR dB gain | IoU gain |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for item in payload["ratios"]:
        lines.append(
            f"| {item['ours']} | {item['peer']} | {item['wall_time']:.2f}x | {item['cpu_time']:.2f}x | "
            f"{item['peak_rss']:.2f}x | {item['rss_above_baseline']:.2f}x | "
            f"{item['snr_db_gain']:+.2f} | {item['iou_gain']:+.4f} |"
        )
    lines += ["", "## Runs and phases (seconds; phases inside the last run's process)", ""]
    lines += [
        f"- {side}: wall {list(runs[side]['wall_runs_s'])}, CPU {list(runs[side]['cpu_runs_s'])}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in runs[side]["phases_s"].items())
        for side in payload["sides"]
    ]
    lines += ["", "## Settings", ""]
    lines += [f"- {side}: `{json.dumps(runs[side]['settings'])}`" for side in payload["sides"]]
    lines += ["", "## Machine", "", machine_markdown, ""]
    return "\n".join(lines)


def ratios(runs: dict[str, SideRun], evals: dict[str, ModelEvaluation]) -> list[dict[str, Any]]:
    """Peer cost over ours (above 1: ours is cheaper) and ours' accuracy minus the peer's."""
    result = []
    for ours in (side for side in runs if side.startswith("ours")):
        for peer in (side for side in runs if not side.startswith("ours")):
            mine, theirs = runs[ours], runs[peer]
            mine_acc, their_acc = evals[ours].accuracy, evals[peer].accuracy
            if mine_acc is None or their_acc is None:
                continue  # only the FP32 reference has no accuracy
            result.append(
                {
                    "ours": ours,
                    "peer": peer,
                    "wall_time": round(theirs.wall_s / mine.wall_s, 2),
                    "cpu_time": round(theirs.cpu_s / mine.cpu_s, 2),
                    "peak_rss": round(theirs.peak_rss_mib / mine.peak_rss_mib, 2),
                    "rss_above_baseline": round(
                        (theirs.peak_rss_mib - theirs.baseline_rss_mib)
                        / max(mine.peak_rss_mib - mine.baseline_rss_mib, 1.0),
                        2,
                    ),
                    "snr_db_gain": round(mine_acc.snr_db - their_acc.snr_db, 2),
                    "iou_gain": round(mine_acc.iou - their_acc.iou, 4),
                }
            )
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=640, help="square input side (a multiple of 32)")
    parser.add_argument(
        "--calibration-images", type=int, default=8, choices=range(1, len(CALIBRATION_POOL) + 1)
    )
    parser.add_argument("--holdout-images", type=int, default=4, choices=range(1, len(HOLDOUT_POOL) + 1))
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument(
        "--ours-batch-size",
        type=int,
        default=0,
        help="also run ours at this calibration batch size (side 'ours-batchN')",
    )
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; times are the medians")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return
    if "ours" not in args.sides:
        parser.error("--sides must include 'ours' (the ratios are against it)")
    if args.size < 32 or args.size % 32:
        parser.error("--size must be a positive multiple of 32 (the detector downsamples by 32)")
    if args.repeats < 1 or args.latency_runs < 1 or args.ours_batch_size < 0:
        parser.error("--repeats and --latency-runs must be at least 1, --ours-batch-size at least 0")
    from importlib.metadata import version

    machine = describe_machine()
    extra = [f"ours-batch{args.ours_batch_size}"] if args.ours_batch_size else []
    sides = ["ours", *extra, *(side for side in args.sides if side != "ours")]
    calibration_names = CALIBRATION_POOL[: args.calibration_images]
    holdout_names = HOLDOUT_POOL[: args.holdout_images]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="calibration-bench-") as scratch:
        workdir = Path(scratch)
        write_archive(workdir / "calibration.zip", calibration_names)
        write_archive(workdir / "holdout.zip", holdout_names)
        job = {
            "model": str(detector_path()),
            "calibration_zip": str(workdir / "calibration.zip"),
            "size": args.size,
            "workdir": str(workdir),
        }
        runs = {}
        for side in sides:
            batch = args.ours_batch_size if side.startswith("ours-batch") else 0
            runs[side] = run_side(side, {**job, "batch_size": batch}, workdir, args.repeats)
        holdout = list(archive_samples(workdir / "holdout.zip", args.size))
        models = {"fp32": str(detector_path())} | {side: runs[side].model_path for side in sides}
        evals = {item.side: item for item in evaluate(models, holdout, args.latency_runs)}
    payload = {
        "benchmark": "calibration",
        "model": DETECTOR,
        "rapidocr": version("rapidocr"),
        "size": args.size,
        "calibration_images": list(calibration_names),
        "holdout_images": list(holdout_names),
        "preprocess": PREPROCESS,
        "probability_threshold": PROBABILITY_THRESHOLD,
        "sides": sides,
        "latency_runs": args.latency_runs,
        "repeats": args.repeats,
        "load_average": {
            "before": [round(v, 2) for v in load_before],
            "after": [round(v, 2) for v in os.getloadavg()],
        },
        # The INT8 models lived in the scratch directory; their paths would mean nothing here.
        "runs": [{k: v for k, v in asdict(run).items() if k != "model_path"} for run in runs.values()],
        "evaluations": [asdict(e) for e in evals.values()],
        "ratios": ratios(runs, evals),
        "machine": machine.to_dict(),
    }
    report = markdown_report(payload, machine.markdown())
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "calibration.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.results / "calibration.md").write_text(report)
    sys.stdout.write(report)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crashed side must not leave a multi-GB core file
    main()
