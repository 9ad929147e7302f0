"""The TensorRT-RTX backend: ahead-of-time GPU engines built on any host, CPU-only included.

Build: the prepared ONNX is parsed into a *strongly typed* network (TensorRT-RTX has no other kind):
INT8 comes only from the Q/DQ nodes in the ONNX and FP16 only from FP16-typed tensors, so
``BuildSpec.precision`` is used for reporting and a warning, and ``keep_layers``/calibration inputs
are ignored (the build log says so). Dynamic inputs get one optimization profile from
``BuildSpec.shapes`` (defaults in :mod:`service.backends.shapes`). The layer report is parsed from
the builder's ``Layers:`` dump (VERBOSE logger + ``ProfilingVerbosity.DETAILED``).

Target GPUs: without a GPU the builder cannot ask one, so it compiles for a set of architectures. By
default TensorRT-RTX targets its portable set, compute capability 8.0, 8.6, 8.9 and 12.0 (Ampere and
later; its CPU-only AOT documentation), and needs an explicit target for Turing (sm_75). A backend
made with ``compute_capabilities=("sm_86",)`` builds for exactly those via
``IBuilderConfig.set_compute_capability``. The targets are part of ``BackendInfo.device`` and
``compute_capability`` (so of every engine cache key and report). A timing cache has no effect on
TensorRT-RTX engines and makes its builder query a GPU, so ``timing_cache_path`` is ignored.

Run: engines need an NVIDIA GPU of a targeted architecture, the TensorRT-RTX runtime and cuda-python.
``load()`` raises EngineNotRunnableHere naming what is missing; where all are present it returns the
shared runner (:mod:`service.backends._trt_runner`), which checks the engine's validity for the GPU
first. TensorRT-RTX compiles kernels when an engine first runs: ``load_with_runtime_cache`` keeps
them in a runtime cache file per engine (the serving pool puts it in the engine cache), so later
loads skip the compilation. Verification: builds run for real on this project's CPU-only test
machines; execution (runner, runtime cache) is verified by review against the installed
``tensorrt_rtx`` API and by CPU tests through a recording CUDA device, never on an RTX GPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from service.backends import _trt_common as common
from service.backends.base import Availability, BackendInfo, BuildSpec, BuiltEngine, Runner
from service.backends.build_input import build_input_from
from service.backends.cuda_device import cuda_device, driver_module
from service.backends.devices import parse_sm as _parse_sm
from service.backends.devices import probe_cuda
from service.backends.layer_report import layer_report_from_builder_log
from service.errors import BackendUnavailable, BadInput, EngineNotRunnableHere

NAME = "tensorrt-rtx"
LABEL = "TensorRT-RTX"
# Architectures TensorRT-RTX's ComputeCapability enum can target (sm_121 is DGX Spark's GB10).
SUPPORTED_TARGETS = ((7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
DEFAULT_TARGETS = ((8, 0), (8, 6), (8, 9), (12, 0))


def _sm(cc: tuple[int, int]) -> str:
    return f"sm_{cc[0]}{cc[1]}"


class TensorRtRtxBackend:
    """Builds TensorRT-RTX engines ahead of time; runs them where an RTX-class GPU is present."""

    name = NAME

    def __init__(self, compute_capabilities: Sequence[str] = ()) -> None:
        targets = tuple(dict.fromkeys(_parse_sm(tag) for tag in compute_capabilities))
        unsupported = [_sm(cc) for cc in targets if cc not in SUPPORTED_TARGETS]
        if unsupported:
            raise BadInput(
                f"TensorRT-RTX cannot target {unsupported}; it builds for "
                f"{[_sm(cc) for cc in SUPPORTED_TARGETS]}."
            )
        self._targets = targets
        self._info: BackendInfo | None = None
        self._info_lock = threading.Lock()

    @property
    def targets(self) -> tuple[tuple[int, int], ...]:
        """The compute capabilities engines are built for (the library's default set when none given)."""
        return self._targets or DEFAULT_TARGETS

    def available(self) -> Availability:
        try:
            _module()
        except BackendUnavailable as exc:
            return Availability(can_build=False, can_run=False, reason=exc.message)
        problem = self._run_problem()
        return Availability(can_build=True, can_run=problem is None, reason=problem or "")

    def describe(self) -> BackendInfo:
        with self._info_lock:
            if self._info is None:
                trt = _module()
                gpu = probe_cuda().first
                targets = ", ".join(_sm(cc) for cc in self.targets)
                default = "" if self._targets else " (TensorRT-RTX default: Ampere and later)"
                where = gpu.describe() if gpu else "ahead-of-time build (no GPU on this host)"
                self._info = BackendInfo(
                    name=NAME,
                    version=str(trt.__version__),
                    device=f"{where}; engines target {targets}{default}",
                    compute_capability=",".join(_sm(cc) for cc in self.targets),
                    strongly_typed=True,
                )
            return self._info

    def build(self, model: bytes, spec: BuildSpec) -> BuiltEngine:
        trt = _module()
        facts = build_input_from(model, spec)
        notes = list(facts.notes) + _ignored_spec_notes(spec)
        if spec.precision == "int8" and not facts.has_qdq:
            notes.append(
                "warning: precision int8 was asked for but the model has no Q/DQ nodes; TensorRT-RTX takes "
                "INT8 only from Q/DQ, so this engine has no INT8 layers"
            )
        logger = common.capturing_logger(trt, keep="VERBOSE")  # the Layers: dump is VERBOSE
        started = time.perf_counter()
        builder = trt.Builder(logger)
        network, parser = common.network_from_onnx(
            trt, builder, logger, facts.parser_bytes, strongly_typed=True, label=LABEL
        )
        config = common.builder_config(trt, builder, workspace_bytes=spec.workspace_bytes)
        self._set_targets(trt, config)
        common.add_optimization_profile(trt, builder, config, network, facts.shape_ranges)
        engine = common.engine_from_network(builder, network, config, logger.records, LABEL)
        seconds = time.perf_counter() - started
        del parser, network, config, builder  # the builder holds hundreds of MB until released

        report = layer_report_from_builder_log((r.message for r in logger.records), facts.node_names)
        if not report.layers:
            notes.append("warning: the builder printed no 'Layers:' dump; the layer report is empty")
        engine_io = [f"[service] engine I/O: {line}" for line in _engine_io_lines(logger.records)]
        log = "\n".join(
            [*(f"[service] {note}" for note in notes), *engine_io, common.log_text(logger.records)]
        )
        return BuiltEngine(
            engine_bytes=engine,
            layer_report=report,
            info=self.describe(),
            build_seconds=seconds,
            build_log=log,
            file_extension=".plan",
        )

    def load(self, engine_bytes: bytes) -> Runner:
        return self._load(engine_bytes, None)

    def load_with_runtime_cache(self, engine_bytes: bytes, cache_file: Path) -> Runner:
        """Load, keeping the kernels TensorRT-RTX compiles at first run in ``cache_file``."""
        return self._load(engine_bytes, cache_file)

    def _load(self, engine_bytes: bytes, cache_file: Path | None) -> Runner:
        problem = self._run_problem()
        if problem is not None:
            raise EngineNotRunnableHere(
                f"TensorRT-RTX engines cannot run on this host: {problem}. Download the engine and run it "
                "on an NVIDIA GPU it targets, or build with backend 'onnxruntime' to run on this CPU."
            )
        from service.backends._trt_runner import TrtRunner

        return TrtRunner(_module(), engine_bytes, label=LABEL, device=cuda_device(), runtime_cache=cache_file)

    def _set_targets(self, trt: ModuleType, config: object) -> None:
        if not self._targets:
            return  # the library's default portable set
        config.num_compute_capabilities = len(self._targets)  # type: ignore[attr-defined]
        for position, cc in enumerate(self._targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{cc[0]}{cc[1]}"), position)  # type: ignore[attr-defined]

    def _run_problem(self) -> str | None:
        """Why engines cannot run here, or None when they can."""
        probe = probe_cuda()
        gpu = probe.first
        if gpu is None:
            return f"running needs an NVIDIA GPU and {probe.reason}"
        if gpu.compute_capability not in self.targets and gpu.compute_capability < (12, 0):
            return (
                f"the GPU is {gpu.describe()}, which is not among the targeted architectures "
                f"{[_sm(cc) for cc in self.targets]}"
            )
        try:
            driver_module()
        except BackendUnavailable as exc:
            return exc.message
        return None


def _ignored_spec_notes(spec: BuildSpec) -> list[str]:
    notes: list[str] = []
    if spec.keep_layers:
        notes.append(
            f"keep_layers {list(spec.keep_layers)} ignored: TensorRT-RTX is strongly typed; layers stay "
            "out of INT8 by carrying no Q/DQ and FP16/FP32 types in the ONNX"
        )
    if spec.calibration_cache is not None or spec.calibration_batches is not None:
        notes.append("calibration cache/batches ignored: TensorRT-RTX takes INT8 scales only from Q/DQ nodes")
    if spec.timing_cache_path:
        notes.append("timing_cache_path ignored: timing caches do not affect TensorRT-RTX engines")
    return notes


def _engine_io_lines(records: Sequence[common.LogRecord]) -> list[str]:
    """The ``I/O Tensors:`` part of the (VERBOSE) layer dump: each engine input and output with its
    type and optimization-profile shapes, kept in the build log as evidence of what was built."""
    for record in reversed(records):
        if "I/O Tensors:" in record.message:
            tail = record.message.split("I/O Tensors:", 1)[1]
            return [line.strip() for line in tail.splitlines() if line.strip().startswith("Name:")]
    return []


def _module() -> ModuleType:
    try:
        import tensorrt_rtx
    except ImportError as exc:
        raise BackendUnavailable(
            f"TensorRT-RTX is not installed (pip install tensorrt-rtx-cu12; module tensorrt_rtx): {exc}"
        ) from exc
    return tensorrt_rtx
