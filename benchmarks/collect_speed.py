"""Activation collection speed and memory: this tree's ``collect_histograms`` vs an older revision's.

Run: ``.venv/bin/python -m benchmarks.collect_speed [--inputs 48 --size 640 --baseline-rev REV ...]``.

On rapidocr's trained PP-OCRv6 text detector at ``--size`` x ``--size`` with ``--inputs`` photos
(random crops of skimage's astronaut, camera, coffee, page, text, chelsea, rocket, ... resized,
BGR, ``(x / 255 - 0.5) / 0.5``, NCHW), each side collects the histograms of the tensors the
service's TensorRT placement calibrates (``placement_summary(model).tensors_to_calibrate``) in
batches of ``--batch-size``, in its own subprocess:

* ``new``: ``collect_histograms`` of this tree.
* ``old``: ``collect_histograms`` of ``--baseline-rev`` (default: the last exact two-pass
  revision), run from a ``git archive`` of that revision's ``service/`` package.
* ``plain``: the unmodified model through a default ONNX Runtime CPU session on the same batches,
  the floor any collection pays.

Each side's wall time and CPU time (user + system) of the collection alone, and peak RSS of its
process (``ru_maxrss`` from ``wait4``; the inputs are read from per-sample ``.npy`` files batch by
batch, so they add one batch to it). Thresholds of every method from both sides' histograms are
compared per tensor (ratio new / old: median, lowest, highest, share within 1 % and 5 %).
Results go to ``benchmarks/results/collect_speed.{json,md}`` with the machine. The CPU is shared
with other work, so CPU seconds are the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a worker script: this file's directory is sys.path[0]
    sys.path.pop(0)

RESULTS_DIR = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
DETECTOR = "PP-OCRv6_det_small.onnx"
PHOTOS = ("astronaut", "camera", "coffee", "page", "text", "chelsea", "rocket", "immunohistochemistry")
# The last revision whose collect_histograms made two exact passes over whole activations.
DEFAULT_BASELINE_REV = "c55ca3f"
SIDES = ("plain", "old", "new")


def detector_path() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models" / DETECTOR


def make_inputs(count: int, size: int, directory: Path, seed: int = 0) -> None:
    """``count`` preprocessed photo crops, one ``sample_NNN.npy`` ([1, 3, size, size]) each."""
    from skimage import data, transform

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        image = getattr(data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos.append(image[..., :3].astype(np.float32) / 255.0)
    for index in range(count):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        side = int(rng.integers(min(height, width) // 2, min(height, width) + 1))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = transform.resize(photo[top : top + side, left : left + side], (size, size), anti_aliasing=True)
        bgr = crop[..., ::-1]
        sample = ((bgr - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)
        np.save(directory / f"sample_{index:03d}.npy", sample)


def _batches(directory: Path, batch_size: int) -> Any:
    files = sorted(directory.glob("sample_*.npy"))
    for start in range(0, len(files), batch_size):
        yield {"x": np.concatenate([np.load(f) for f in files[start : start + batch_size]])}


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One side in this process: returns timings, rusage before collection, thresholds."""
    import resource

    import onnx

    directory, batch_size = Path(job["inputs"]), int(job["batch_size"])
    model = onnx.load(job["model"])
    tensors = job["tensors"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    result: dict[str, Any] = {"rss_before_mib": before.ru_maxrss / 1024}
    start = time.perf_counter()
    if job["side"] == "plain":
        import onnxruntime

        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        for feeds in _batches(directory, batch_size):
            session.run(None, feeds)
    else:
        from service.calibration.algorithms import CALIBRATION_METHODS, thresholds_from_histograms
        from service.calibration.collect import collect_histograms

        hists = collect_histograms(model, lambda: _batches(directory, batch_size), tensors)
        result["thresholds"] = {m: thresholds_from_histograms(hists, m) for m in CALIBRATION_METHODS}
        result["bins"] = sorted({h.num_bins for h in hists.values()})
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["wall_s"] = time.perf_counter() - start
    result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def run_side(side: str, job: dict[str, Any], package_root: Path, scratch: Path) -> dict[str, Any]:
    """Run one side in a child process whose ``service`` comes from ``package_root``."""
    job_path, out_path = scratch / f"{side}.job.json", scratch / f"{side}.out.json"
    job_path.write_text(json.dumps({**job, "side": side}))
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path), str(out_path)]
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"side {side} failed with status {status}")
    result: dict[str, Any] = json.loads(out_path.read_text())
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def compare(
    new: dict[str, dict[str, float]], old: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Per method: ratio new / old over the tensors."""
    table = {}
    for method, ours in new.items():
        ratios = np.array([ours[name] / old[method][name] for name in ours])
        table[method] = {
            "median": float(np.median(ratios)),
            "lowest": float(ratios.min()),
            "highest": float(ratios.max()),
            "within_1pct": float(np.mean(np.abs(ratios - 1) <= 0.01)),
            "within_5pct": float(np.mean(np.abs(ratios - 1) <= 0.05)),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=48)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--baseline-rev", default=DEFAULT_BASELINE_REV)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job_path, out_path = args.worker
        out_path.write_text(json.dumps(run_worker(json.loads(job_path.read_text()))))
        return

    import onnx

    from benchmarks._machine import describe_machine
    from service.quantize.targets import placement_summary

    machine = describe_machine()
    model_path = detector_path()
    tensors = list(placement_summary(onnx.load(model_path)).tensors_to_calibrate)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        (scratch / "inputs").mkdir()
        make_inputs(args.inputs, args.size, scratch / "inputs")
        baseline = scratch / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.baseline_rev, "service"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        (scratch / "baseline.tar").write_bytes(archive)
        with tarfile.open(scratch / "baseline.tar") as tar:
            tar.extractall(baseline, filter="data")
        job = {
            "model": str(model_path),
            "inputs": str(scratch / "inputs"),
            "batch_size": args.batch_size,
            "tensors": tensors,
        }
        for side in args.sides:
            root = baseline if side == "old" else ROOT
            results[side] = run_side(side, job, root, scratch)
            print(side, {k: v for k, v in results[side].items() if k != "thresholds"}, flush=True)
    agreement = (
        compare(results["new"]["thresholds"], results["old"]["thresholds"])
        if {"new", "old"} <= results.keys()
        else {}
    )
    record = {
        "machine": machine.to_dict(),
        "setup": {
            "model": DETECTOR,
            "size": args.size,
            "inputs": args.inputs,
            "batch_size": args.batch_size,
            "tensors": len(tensors),
            "baseline_rev": args.baseline_rev,
        },
        "sides": results,
        "agreement_new_over_old": agreement,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "collect_speed.json").write_text(json.dumps(record, indent=1))
    (args.results / "collect_speed.md").write_text(markdown(record, machine.markdown()))


def markdown(record: dict[str, Any], machine: str) -> str:
    setup = record["setup"]
    lines = [
        "# Activation collection: one pass with in-graph probes vs two exact passes",
        "",
        f"`python -m benchmarks.collect_speed`: {setup['model']} at {setup['size']}x{setup['size']}, "
        f"{setup['inputs']} photo crops in batches of {setup['batch_size']}, {setup['tensors']} "
        f"calibrated tensors; `old` is revision {setup['baseline_rev']}.",
        "",
        "| side | wall s | CPU s | peak RSS MiB | RSS before collection MiB | histogram bins |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for side, r in record["sides"].items():
        bins = r.get("bins")
        bins_text = f"{bins[0]}-{bins[-1]}" if bins else "-"
        lines.append(
            f"| {side} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{r['rss_before_mib']:.0f} | {bins_text} |"
        )
    if record["agreement_new_over_old"]:
        lines += [
            "",
            "Thresholds, ratio new / old per tensor:",
            "",
            "| method | median | lowest | highest | within 1 % | within 5 % |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method, a in record["agreement_new_over_old"].items():
            lines.append(
                f"| {method} | {a['median']:.4f} | {a['lowest']:.4f} | {a['highest']:.4f} | "
                f"{a['within_1pct']:.0%} | {a['within_5pct']:.0%} |"
            )
    lines += ["", machine, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
