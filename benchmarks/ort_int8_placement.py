"""ORT CPU latency and accuracy: FP32 vs TensorRT-placement INT8 vs ONNX Runtime-placement INT8.

Run from the repository root:
    .venv/bin/python -m benchmarks.ort_int8_placement [--rounds-det N] [--rounds-cls N] --out FILE.json
Every INT8 model comes from the service's own quantize_model (entropy calibration), built into an
ONNX Runtime engine by the service's OnnxRuntimeBackend (ORT_ENABLE_ALL, saved optimized graph).
Latency: the engines are timed interleaved (one run of each per round, 1 intra-op thread), so load
from other processes on this shared machine hits every variant alike; median and p10 per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, "/work/main")

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks._machine import describe_machine
from service.accuracy.outputs import evaluate_with_onnxruntime
from service.backends.base import BuildSpec
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.builds.pipeline import layer_counts
from service.quantize.ort_placement import plan_ort_qdq
from service.quantize.ort_prepare import onnxruntime_prepared
from service.quantize.ort_qdq import insert_ort_qdq
from service.quantize.pipeline import QuantizationPlan, quantize_model
from tests.data_factory import classifier_samples
from tests.model_factory import resnet_block_classifier
from tests.quantize.support import rapidocr_model

CAL_PHOTOS = [
    "page",
    "astronaut",
    "coffee",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
]
HOLD_PHOTOS = ["text", "chelsea", "coins", "logo"]


def photo_input(name: str, size: int) -> np.ndarray:
    import skimage.data
    import skimage.transform

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = skimage.transform.resize(image[..., :3], (size, size), anti_aliasing=True)  # floats in [0, 1]
    bgr = image[..., ::-1]
    return ((bgr - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)  # rapidocr's det preprocessing


def int8_activation_variant(model: onnx.ModelProto, amax: dict[str, float]) -> onnx.ModelProto:
    work = onnxruntime_prepared(model)
    plan = plan_ort_qdq(work)
    insert_ort_qdq(work, plan, amax, activation_type="int8")
    onnx.checker.check_model(work)
    return work


def engine(model: onnx.ModelProto, precision: str) -> tuple[bytes, dict[str, int], float]:
    built = OnnxRuntimeBackend().build(model.SerializeToString(), BuildSpec(precision=precision))  # type: ignore[arg-type]
    return built.engine_bytes, layer_counts(built.layer_report), built.build_seconds


def session(engine_bytes: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as OrtRunner
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(engine_bytes, options, providers=["CPUExecutionProvider"])


def interleaved(
    sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], rounds: int
) -> dict[str, dict[str, float]]:
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {
            "median_ms": statistics.median(values),
            "p10_ms": values[len(values) // 10],
            "min_ms": values[0],
            "runs": len(values),
        }
    return out


def per_sample(
    model: onnx.ModelProto, candidate: onnx.ModelProto, hold: list[dict[str, np.ndarray]], names: list[str]
) -> dict:
    """Detector view per held-out image: map cosine and agreement at PP-OCR's 0.3 threshold."""
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = {}
    for name, feeds in zip(names, hold, strict=True):
        a, b = (
            ref.run(None, feeds)[0].ravel().astype(np.float64),
            got.run(None, feeds)[0].ravel().astype(np.float64),
        )
        rows[name] = {
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
            "text_pixels_fp32": float((a > 0.3).mean()),
            "text_pixels_int8": float((b > 0.3).mean()),
            "threshold_agreement": float(((a > 0.3) == (b > 0.3)).mean()),
        }
    return rows


def study(
    name: str,
    model: onnx.ModelProto,
    cal: list[dict[str, np.ndarray]],
    hold: list[dict[str, np.ndarray]],
    latency_feeds: list[tuple[str, dict[str, np.ndarray]]],
    rounds: int,
    methods: tuple[str, ...] = ("entropy",),
    hold_names: list[str] | None = None,
) -> dict:
    samples = sum(next(iter(b.values())).shape[0] for b in cal)
    variants: dict[str, onnx.ModelProto] = {"fp32": model}
    accuracy: dict[str, dict] = {}
    quantize_s: dict[str, float] = {}
    images: dict[str, dict] = {}
    for method in methods:
        for target in ("tensorrt", "onnxruntime"):
            started = time.perf_counter()
            outcome = quantize_model(
                model,
                lambda: iter(cal),
                samples,
                lambda: iter(hold),
                QuantizationPlan(method=method, target=target),
            )
            quantize_s[f"{target}/{method}"] = time.perf_counter() - started
            key = f"int8_{target}_placement"
            candidates = {key: outcome.qdq_model}
            if target == "onnxruntime":
                candidates[f"{key}_s8_activations"] = int8_activation_variant(model, outcome.activation_amax)
            for label, candidate in candidates.items():
                if method == methods[0]:
                    variants[label] = candidate
                report = evaluate_with_onnxruntime(model, candidate, hold)
                accuracy[f"{label}/{method}"] = {
                    o.name: {
                        "cosine": o.cosine,
                        "worst_sample_cosine": o.worst_sample_cosine,
                        "snr_db": o.snr_db,
                        "top1_agreement": o.top1_agreement,
                    }
                    for o in report.outputs
                }
                if hold_names is not None:
                    images[f"{label}/{method}"] = per_sample(model, candidate, hold, hold_names)
    engines = {}
    counts = {}
    for key, candidate in variants.items():
        engines[key], counts[key], _ = engine(candidate, "fp32" if key == "fp32" else "int8")
    sessions = {key: session(b) for key, b in engines.items()}
    latency = {label: interleaved(sessions, feeds, rounds) for label, feeds in latency_feeds}
    ops = {
        key: dict(
            Counter(
                layer.type
                for layer in OnnxRuntimeBackend()
                .build(variants[key].SerializeToString(), BuildSpec(precision="int8"))
                .layer_report.layers
            )
        )
        for key in variants
    }
    result = {
        "model": name,
        "accuracy_vs_fp32_on_held_out": accuracy,
        "per_image": images,
        "layer_counts": counts,
        "engine_op_types": ops,
        "latency": latency,
        "quantize_seconds": quantize_s,
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds-det", type=int, default=40)
    parser.add_argument("--rounds-cls", type=int, default=300)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    machine = describe_machine().to_dict()
    results = []

    for channels, size in ((8, 16), (64, 64)):
        cls = resnet_block_classifier(channels=channels, size=size)
        cal = [{"input": b} for b in np.split(classifier_samples(64, size=size), 8)]
        hold = [{"input": classifier_samples(32, size=size, seed=7)}]
        results.append(
            study(
                f"resnet_block_classifier(channels={channels}, size={size})",
                cls,
                cal,
                hold,
                [
                    ("batch 1", {"input": classifier_samples(1, size=size, seed=9)}),
                    ("batch 32", {"input": classifier_samples(32, size=size, seed=9)}),
                ],
                args.rounds_cls,
            )
        )

    det = onnx.load(str(rapidocr_model("PP-OCRv6_det_small.onnx")))
    s = args.size
    dcal = [{"x": photo_input(n, s)} for n in CAL_PHOTOS]
    dhold = [{"x": photo_input(n, s)} for n in HOLD_PHOTOS]
    results.append(
        study(
            f"PP-OCRv6_det_small (rapidocr, 1x3x{s}x{s})",
            det,
            dcal,
            dhold,
            [("batch 1", dhold[0])],
            args.rounds_det,
            methods=("entropy", "max"),
            hold_names=HOLD_PHOTOS,
        )
    )
    with open(args.out, "w") as f:
        json.dump({"machine": machine, "ort_threads": 1, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
