"""The enterprise TensorRT backend (10.x and 11.x, with cuda-python): builds and runs on an NVIDIA GPU.

TensorRT 10 (implicit precision, ``BackendInfo.strongly_typed`` False):

- ``fp16``: ``BuilderFlag.FP16``. ``int8``: ``BuilderFlag.INT8`` + ``FP16``, and then
  - a model with Q/DQ nodes is explicitly quantized (its scales are used; calibration inputs ignored),
  - otherwise TensorRT's ``IInt8EntropyCalibrator2`` (``service.backends.trt_calibrator``) reads
    ``spec.calibration_cache`` and/or calibrates on ``spec.calibration_batches``; the cache it writes
    is returned in ``BuiltEngine.calibration_cache``. INT8 with neither is BadInput.
- ``keep_layers``: the network layers made from those ONNX nodes (matched by the parser's
  ``[ONNX Layer: ...]`` metadata, else by layer name) are pinned with ``layer.precision`` and
  ``set_output_type`` to FP16 in INT8 builds and FP32 in FP16 builds, under
  ``BuilderFlag.OBEY_PRECISION_CONSTRAINTS``.

TensorRT 11 removed implicit quantization: networks are strongly typed, INT8 comes only from Q/DQ and
FP16 only from FP16 types in the ONNX; precision flags, calibration and ``keep_layers`` are ignored and
the build log says so (``BackendInfo.strongly_typed`` True, so the build pipeline hands over a Q/DQ,
FP16-typed model).

Both: one optimization profile for dynamic inputs; the layer report from ``IEngineInspector``
(JSON, ``ProfilingVerbosity.DETAILED``, with an execution context at the profile's opt shapes so
formats are resolved); a timing cache persisted per GPU: ``spec.timing_cache_path`` names the file
and the GPU architecture and TensorRT version are inserted before its suffix
(``timing.cache`` -> ``timing.sm_89.trt10.8.0.cache``) so hosts with different GPUs sharing one volume
never mix caches; concurrent builds merge theirs in (``ITimingCache.combine``) and write atomically.
Calibration batches take the network's input dtypes, static batch size and static dims
(:mod:`service.backends._trt_calibration`). The runner is :class:`service.backends._trt_runner.TrtRunner`
(over :mod:`service.backends.cuda_device`, CUDA-event stage timings).

Verification: this module runs only where a GPU, enterprise TensorRT and cuda-python are present
(tests marked ``gpu``); no machine this project is built on has them, so it is verified by review
against the TensorRT 10.8/11 sources and by CPU tests of its logic (TensorRT-RTX objects with the same
API, a recording CUDA device, a runtime stand-in). FP32 builds clear ``BuilderFlag.TF32`` (the build
log says so); other precisions leave it on for the layers that stay FP32, and say that too. The
logger keeps WARNING and above only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from service.backends import _trt_common as common
from service.backends._trt_calibration import calibrator_for
from service.backends.base import Availability, BackendInfo, BuildSpec, BuiltEngine, LayerReport, Runner
from service.backends.build_input import BuildInput, build_input_from
from service.backends.cuda_device import CudaDevice, cuda_device, driver_module
from service.backends.devices import GpuDevice, probe_cuda
from service.backends.layer_report import layer_report_from_inspector_json, onnx_nodes_from_metadata
from service.errors import BackendUnavailable, BadInput, BuildFailed, EngineNotRunnableHere

if TYPE_CHECKING:
    from service.backends.trt_calibrator import CalibratorState

NAME = "tensorrt"
LABEL = "TensorRT"
_TIMING_CACHE_LOCK = threading.Lock()


class TensorRtBackend:
    """Enterprise TensorRT on the first visible GPU (``CUDA_VISIBLE_DEVICES`` picks it)."""

    name = NAME

    def __init__(self, *, cuda_graph: bool = False) -> None:
        self.cuda_graph = cuda_graph
        self._info: BackendInfo | None = None
        self._info_lock = threading.Lock()

    def available(self) -> Availability:
        problem = _problem()
        return Availability(can_build=problem is None, can_run=problem is None, reason=problem or "")

    def describe(self) -> BackendInfo:
        with self._info_lock:
            if self._info is None:
                trt, gpu = _require()
                self._info = BackendInfo(
                    name=NAME,
                    version=str(trt.__version__),
                    device=gpu.describe(),
                    compute_capability=gpu.sm,
                    strongly_typed=_major(trt) >= 11,
                )
            return self._info

    def build(self, model: bytes, spec: BuildSpec) -> BuiltEngine:
        trt, gpu = _require()
        device = cuda_device()
        facts = build_input_from(model, spec)
        notes = list(facts.notes)
        logger = common.capturing_logger(trt, keep="WARNING")  # VERBOSE tactic lines are never kept
        strongly_typed = _major(trt) >= 11
        written: dict[str, bytes] = {}
        started = time.perf_counter()
        # The builder, the calibrator's device buffers and the inspector share the primary context.
        with device.activate():
            builder = trt.Builder(logger)
            network, parser = common.network_from_onnx(
                trt, builder, logger, facts.parser_bytes, strongly_typed=strongly_typed, label=LABEL
            )
            config = common.builder_config(trt, builder, workspace_bytes=spec.workspace_bytes)
            common.add_optimization_profile(trt, builder, config, network, facts.shape_ranges)
            notes.append(_tf32_policy(trt, config, spec))
            if strongly_typed:
                notes.append(_strongly_typed_note(trt, spec))
                calibrator = None
            else:
                calibrator = _configure_precision(
                    trt, builder, config, network, facts, spec, notes, written, device
                )
            cache_file = _timing_cache_file(spec.timing_cache_path, gpu, str(trt.__version__))
            if cache_file is not None:
                _load_timing_cache(config, cache_file, notes)
            try:
                engine = engine_then_calibration_failure(
                    partial(common.engine_from_network, builder, network, config, logger.records, LABEL),
                    calibrator.state if calibrator is not None else None,
                )
            finally:
                if calibrator is not None:
                    calibrator.free()
            if cache_file is not None:
                _save_timing_cache(config, cache_file)
            seconds = time.perf_counter() - started
            del parser, network, builder
            report = _inspect(trt, engine, facts, logger)
        log = "\n".join([*(f"[service] {note}" for note in notes), common.log_text(logger.records)])
        return BuiltEngine(
            engine_bytes=engine,
            layer_report=report,
            info=self.describe(),
            build_seconds=seconds,
            build_log=log,
            file_extension=".plan",
            calibration_cache=written.get("cache"),
        )

    def load(self, engine_bytes: bytes) -> Runner:
        problem = _problem()
        if problem is not None:
            raise EngineNotRunnableHere(f"TensorRT engines cannot run on this host: {problem}.")
        from service.backends._trt_runner import TrtRunner

        return TrtRunner(
            _module(), engine_bytes, label=LABEL, device=cuda_device(), cuda_graph=self.cuda_graph
        )


def engine_then_calibration_failure(build: Callable[[], bytes], state: CalibratorState | None) -> bytes:
    """Run ``build``; a failure recorded inside a calibrator callback wins over the build's own error.

    A cancelled job or bad calibration data stops calibration from inside TensorRT, which then fails
    the build: the cause (JobCancelled, InvalidCalibrationSet, ...) is what the job must report, not
    the BuildFailed it led to.
    """
    try:
        engine = build()
    except BuildFailed:
        if state is not None:
            state.raise_failure()
        raise
    if state is not None:
        state.raise_failure()
    return engine


def _tf32_policy(trt: ModuleType, config: Any, spec: BuildSpec) -> str:
    """FP32 builds compute in FP32 (TF32 cleared); other builds may use TF32 where layers stay FP32."""
    if spec.precision == "fp32":
        return common.disable_tf32(trt, config)
    return (
        f"TF32 enabled (TensorRT's default): layers of this {spec.precision} build left in FP32 may use TF32"
    )


def _configure_precision(
    trt: ModuleType,
    builder: Any,
    config: Any,
    network: Any,
    facts: BuildInput,
    spec: BuildSpec,
    notes: list[str],
    written: dict[str, bytes],
    device: CudaDevice,
) -> Any | None:
    """TensorRT 10's implicit-precision flags, calibrator and pinned layers; returns the calibrator."""
    calibrator = None
    if spec.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif spec.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # layers TensorRT cannot run in INT8 fall back to FP16
        if facts.has_qdq:
            notes.append("explicit quantization: INT8 scales come from the model's Q/DQ nodes")
        elif spec.calibration_batches is not None or spec.calibration_cache is not None:
            calibrator = calibrator_for(trt, builder, config, network, spec, device, notes, written)
        else:
            raise BadInput(
                "An INT8 build on TensorRT 10 needs INT8 scales: a model with Q/DQ nodes, a calibration "
                "cache, or calibration batches. Attach a calibration set to the build."
            )
    if spec.keep_layers:
        if spec.precision == "fp32":
            notes.append("keep_layers ignored: an FP32 build keeps every layer in FP32")
        else:
            kept = trt.float16 if spec.precision == "int8" else trt.float32
            _pin_layers(trt, network, spec.keep_layers, kept, notes)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return calibrator


def _pin_layers(trt: ModuleType, network: Any, keep: tuple[str, ...], dtype: Any, notes: list[str]) -> None:
    floating = (trt.float32, trt.float16)
    wanted, pinned, matched = set(keep), 0, set()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        nodes = set(onnx_nodes_from_metadata(getattr(layer, "metadata", "") or "")) or {layer.name}
        hits = nodes & wanted
        if not hits:
            continue
        matched |= hits
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if layer.type == trt.LayerType.CONSTANT or any(out.dtype not in floating for out in outputs):
            continue  # weights and index/shape tensors carry no compute precision to pin
        layer.precision = dtype
        for position in range(layer.num_outputs):
            layer.set_output_type(position, dtype)
        pinned += 1
    notes.append(f"kept {sorted(matched)} out of INT8: {pinned} network layers pinned to {dtype}")
    missing = sorted(wanted - matched)
    if missing:
        notes.append(f"warning: keep_layers {missing} match no layer of the parsed network")


def _strongly_typed_note(trt: ModuleType, spec: BuildSpec) -> str:
    ignored = [
        label
        for label, present in (
            ("precision flags", spec.precision != "fp32"),
            ("keep_layers", bool(spec.keep_layers)),
            ("calibration", spec.calibration_cache is not None or spec.calibration_batches is not None),
        )
        if present
    ]
    return (
        f"TensorRT {trt.__version__} builds strongly typed networks: precisions come from the ONNX types "
        f"and Q/DQ nodes" + (f"; ignored: {', '.join(ignored)}" if ignored else "")
    )


def _inspect(trt: ModuleType, engine_bytes: bytes, facts: BuildInput, logger: Any) -> LayerReport:
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise BuildFailed(
            "TensorRT built an engine it cannot deserialize on the same GPU; see the build log."
        )
    context = engine.create_execution_context()
    for name, shape_range in facts.shape_ranges.items():
        context.set_input_shape(name, shape_range.opt)  # resolves the formats reported for dynamic shapes
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return layer_report_from_inspector_json(text, facts.node_names)


def _timing_cache_file(path: str | None, gpu: GpuDevice, version: str) -> Path | None:
    if not path:
        return None
    base = Path(path)
    return base.with_name(f"{base.stem}.{gpu.sm}.trt{version}{base.suffix or '.cache'}")


def _load_timing_cache(config: Any, file: Path, notes: list[str]) -> None:
    """Use the stored timing cache; a corrupt or mismatched one is replaced by an empty cache."""
    data = file.read_bytes() if file.exists() else b""
    try:
        cache = config.create_timing_cache(data) if data else None
        accepted = cache is not None and config.set_timing_cache(cache, False)
    except (RuntimeError, TypeError, ValueError):  # TensorRT raises on some corrupt files
        accepted = False
    if data and not accepted:
        notes.append(f"timing cache {file} is corrupt or from another GPU/TensorRT; starting an empty one")
    if not accepted:
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config: Any, file: Path) -> None:
    with _TIMING_CACHE_LOCK:
        ours = config.get_timing_cache()
        if file.exists():  # another build may have written since we loaded: merge rather than overwrite
            merged = config.create_timing_cache(file.read_bytes())
            if merged.combine(ours, False):
                ours = merged
        file.parent.mkdir(parents=True, exist_ok=True)
        scratch = file.with_name(f"{file.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        scratch.write_bytes(bytes(memoryview(ours.serialize())))
        os.replace(scratch, file)


def _major(trt: ModuleType) -> int:
    return int(str(trt.__version__).split(".")[0])


def _problem() -> str | None:
    try:
        _module()
    except BackendUnavailable as exc:
        return exc.message
    try:
        driver_module()
    except BackendUnavailable as exc:
        return exc.message
    probe = probe_cuda()
    if not probe.has_gpu:
        return f"TensorRT builds and runs on an NVIDIA GPU, and {probe.reason}"
    return None


def _require() -> tuple[ModuleType, GpuDevice]:
    problem = _problem()
    gpu = probe_cuda().first
    if problem is not None or gpu is None:
        raise BackendUnavailable(f"The TensorRT backend cannot be used here: {problem}.")
    return _module(), gpu


def _module() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "Enterprise TensorRT is not installed (module tensorrt; it ships in NVIDIA's TensorRT "
            f"container, install the 'gpu' extra there): {exc}"
        ) from exc
    return tensorrt
