"""The ONNX Runtime backend: CPU engines that build and run on any host.

Engine: the optimized model ONNX Runtime saves (``SessionOptions.optimized_model_filepath``) at
``ORT_ENABLE_ALL``, with the service's build record in the model's ``metadata_props``, so
``load(engine_bytes)`` alone reopens it:

- ``engine_service.backend`` = ``onnxruntime``; ``engine_service.ort_version``: the version that built it;
- ``engine_service.session_options``: JSON of how it was optimized and how it must be opened (graph
  optimizations already applied, so the runner opens it with ``ORT_DISABLE_ALL`` on the CPU provider);
- ``engine_service.shapes``: the requested shape ranges (reported as ``IOSpec.profile``; ONNX Runtime
  itself accepts any shape its graph allows);
- ``engine_service.precision``: the precision the engine was built for.

At ``ORT_ENABLE_ALL`` the saved graph holds CPU-specific fused operators (FusedConv, FusedGemm,
QLinearConv, NCHWc Conv with ReorderInput/ReorderOutput) laid out for this CPU's vector width. That is
fine for an engine: it loads only with the same ONNX Runtime version, which ``load()`` checks (a
mismatch is EngineNotRunnableHere: rebuild), and the CPU's instruction set is part of
``BackendInfo.device`` so engines are cached per kind of CPU.

Precision comes from the model (Q/DQ nodes run with ONNX Runtime's int8 kernels); ``keep_layers`` and
calibration inputs are ignored. The layer report is the optimized graph, traced back to the original
nodes (:func:`service.backends.layer_report.layer_report_from_optimized_graph`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from service.backends.base import (
    Availability,
    BackendInfo,
    BuildSpec,
    BuiltEngine,
    IOSpec,
    Runner,
    RunnerBase,
    ShapeRange,
    StageTimings,
)
from service.backends.build_input import build_input_from
from service.backends.cpu_isa import CpuIsa, host_cpu_isa
from service.backends.layer_report import layer_report_from_optimized_graph
from service.errors import (
    BackendUnavailable,
    BadInput,
    BuildFailed,
    EngineNotRunnableHere,
    InvalidInferenceInput,
    InvalidModel,
    ServiceError,
)

NAME = "onnxruntime"
META_BACKEND = "engine_service.backend"
META_VERSION = "engine_service.ort_version"
META_OPTIONS = "engine_service.session_options"
META_SHAPES = "engine_service.shapes"
META_PRECISION = "engine_service.precision"
_PROVIDERS = ["CPUExecutionProvider"]
_GENERATED_SUFFIX = re.compile(r"_token_\d+$")
_QUIET = 3  # ORT log severity ERROR: its optimizer's warnings ("Removing initializer ...") are noise here
_ORT_TYPES = {
    "float": "float32", "float16": "float16", "double": "float64", "bfloat16": "bfloat16", "int8": "int8",
    "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32", "uint32": "uint32",
    "int64": "int64", "uint64": "uint64", "bool": "bool", "string": "object",
}  # fmt: skip


class OnnxRuntimeBackend:
    """Builds optimized ONNX Runtime CPU engines and runs them with a thread-safe session."""

    name = NAME

    def __init__(self, *, intra_op_threads: int | None = None, cpu_isa: str | None = None) -> None:
        if intra_op_threads is not None and intra_op_threads < 1:
            raise BadInput(
                f"intra_op_threads must be >= 1 or None (ONNX Runtime's default), got {intra_op_threads}."
            )
        self.intra_op_threads = intra_op_threads
        self.cpu_isa = host_cpu_isa(cpu_isa)  # decides the INT8 weight range of its Q/DQ placement
        self._info: BackendInfo | None = None
        self._info_lock = threading.Lock()

    def available(self) -> Availability:
        try:
            _module()
        except BackendUnavailable as exc:
            return Availability(can_build=False, can_run=False, reason=exc.message)
        return Availability(can_build=True, can_run=True)

    def describe(self) -> BackendInfo:
        with self._info_lock:
            if self._info is None:
                ort = _module()
                self._info = BackendInfo(
                    name=NAME,
                    version=str(ort.__version__),
                    device=cpu_description(self.cpu_isa),
                    strongly_typed=True,
                )
            return self._info

    def build(self, model: bytes, spec: BuildSpec) -> BuiltEngine:
        ort = _module()
        facts = build_input_from(model, spec, complete_shapes=False)  # ORT runs any shape its graph allows
        notes = list(facts.notes)
        if spec.keep_layers or spec.calibration_cache is not None or spec.calibration_batches is not None:
            notes.append(
                "keep_layers/calibration ignored: ONNX Runtime runs the Q/DQ placement of the model as given"
            )
        if spec.precision == "int8" and not facts.has_qdq:
            notes.append(
                "warning: precision int8 was asked for but the model has no Q/DQ nodes; it runs in FP32"
            )
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ort-build-") as scratch:
            target = Path(scratch) / "optimized.onnx"
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = str(target)
            options.intra_op_num_threads = 1  # building runs no inference; don't spin up a thread pool
            options.log_severity_level = _QUIET
            try:
                ort.InferenceSession(model, options, providers=_PROVIDERS)
            except _ort_errors(ort) as exc:
                raise _build_error(ort, exc) from exc
            optimized = onnx.load(str(target))
        seconds = time.perf_counter() - started

        _renumber_generated_names(optimized, {node.name for node in facts.model.graph.node})
        report = layer_report_from_optimized_graph(optimized, facts.model)
        _record_build(optimized, ort.__version__, facts.shape_ranges, spec)
        log = [f"[service] {note}" for note in notes]
        before, after = len(facts.model.graph.node), len(optimized.graph.node)
        log.append(f"[service] ONNX Runtime {ort.__version__}: {before} nodes -> {after} at ORT_ENABLE_ALL")
        return BuiltEngine(
            engine_bytes=optimized.SerializeToString(),
            layer_report=report,
            info=self.describe(),
            build_seconds=seconds,
            build_log="\n".join(log),
            file_extension=".onnx",
        )

    def load(self, engine_bytes: bytes) -> Runner:
        ort = _module()
        meta = _engine_metadata(engine_bytes)
        built_with = meta.get(META_VERSION)
        if built_with != ort.__version__:
            raise EngineNotRunnableHere(
                f"This engine was optimized by ONNX Runtime {built_with} and this host has "
                f"{ort.__version__}; its fused CPU operators are specific to the build that made them. "
                "Rebuild the engine here."
            )
        shapes = {
            name: ShapeRange(tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
            for name, r in json.loads(meta.get(META_SHAPES, "{}")).items()
        }
        return OrtRunner(ort, engine_bytes, intra_op_threads=self.intra_op_threads, shapes=shapes)


class OrtRunner(RunnerBase):
    """A CPU inference session over an engine; ``infer`` may be called from many threads at once
    (``InferenceSession.run`` is thread-safe)."""

    def __init__(
        self,
        ort: ModuleType,
        engine_bytes: bytes,
        *,
        intra_op_threads: int | None = None,
        shapes: Mapping[str, ShapeRange] | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # applied at build
        options.log_severity_level = _QUIET
        if intra_op_threads is not None:
            options.intra_op_num_threads = intra_op_threads
        self._errors = _ort_errors(ort)
        self._invalid_argument = ort.capi.onnxruntime_pybind11_state.InvalidArgument
        try:
            self._session: Any = ort.InferenceSession(engine_bytes, options, providers=_PROVIDERS)
        except self._errors as exc:
            raise EngineNotRunnableHere(f"ONNX Runtime could not open this engine: {exc}") from exc
        profiles = dict(shapes or {})
        self._inputs = tuple(_io_spec(arg, profiles.get(arg.name)) for arg in self._session.get_inputs())
        self._outputs = tuple(_io_spec(arg, None) for arg in self._session.get_outputs())
        self._output_names = [spec.name for spec in self._outputs]

    def infer_timed(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], StageTimings]:
        session = self._session  # a local reference keeps the session alive through a concurrent close()
        if session is None:
            raise BackendUnavailable("This ONNX Runtime runner was closed.")
        missing = [spec.name for spec in self._inputs if spec.name not in feeds]
        if missing:
            raise InvalidInferenceInput(
                f"Inputs {missing} are missing; the engine needs {[s.name for s in self._inputs]}."
            )
        started = time.perf_counter()
        try:
            values = session.run(self._output_names, {spec.name: feeds[spec.name] for spec in self._inputs})
        except self._invalid_argument as exc:
            raise InvalidInferenceInput(f"ONNX Runtime rejected the inputs: {exc}") from exc
        except self._errors as exc:
            raise ServiceError(f"ONNX Runtime failed while running the engine: {exc}") from exc
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        outputs = dict(zip(self._output_names, values, strict=True))
        return outputs, StageTimings(h2d_ms=0.0, compute_ms=elapsed_ms, d2h_ms=0.0, device="cpu")

    def close(self) -> None:
        self._session = None


@lru_cache(maxsize=8)
def cpu_description(isa: CpuIsa | None = None) -> str:
    """``CPU (<model>, <vector ISA>, int8 <class>, <n> cores)``.

    The vector ISA decides the NCHWc layouts ORT bakes in; the integer class (``cpu_isa.py``) decides
    how its INT8 kernels accumulate and so how weights are quantized. Both are part of every key.
    """
    isa = isa or host_cpu_isa()
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass  # not Linux: the processor string is all there is
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    vector = next(
        (name for name in ("avx512f", "avx2", "avx", "asimd", "neon") if name in flags), platform.machine()
    )
    return f"CPU ({model}, {vector}, int8 {isa.isa}, {os.cpu_count() or 1} cores)"


def _renumber_generated_names(model: onnx.ModelProto, original_names: set[str]) -> None:
    """Give ORT-generated node names a deterministic numbering, in graph order.

    ORT numbers the names it generates (``ReorderOutput``, ``ReorderOutput_token_12``) in hash-map
    order, so two builds of one model differ only in which node got which number. Renumbering by
    position makes the engine bytes reproducible. Node names are labels; no tensor is renamed.
    """
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.name and node.name not in original_names:
            groups.setdefault(_GENERATED_SUFFIX.sub("", node.name), []).append(node)
    for base, nodes in groups.items():
        if len(nodes) == 1 and not _GENERATED_SUFFIX.search(nodes[0].name):
            continue
        first = 1 if base in original_names else 0
        for number, node in enumerate(nodes, start=first):
            node.name = base if number == 0 else f"{base}_token_{number}"


def _record_build(
    model: onnx.ModelProto, version: str, shapes: Mapping[str, ShapeRange], spec: BuildSpec
) -> None:
    options = {
        "built_with_graph_optimization_level": "ORT_ENABLE_ALL",
        "load_graph_optimization_level": "ORT_DISABLE_ALL",
        "providers": _PROVIDERS,
    }
    ranges = {
        name: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
        for name, r in sorted(shapes.items())
    }
    entries = {
        META_BACKEND: NAME,
        META_VERSION: version,
        META_OPTIONS: json.dumps(options, sort_keys=True),
        META_SHAPES: json.dumps(ranges, sort_keys=True),
        META_PRECISION: spec.precision,
    }
    kept = [prop for prop in model.metadata_props if prop.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def _engine_metadata(engine_bytes: bytes) -> dict[str, str]:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(engine_bytes)
    except DecodeError as exc:
        raise InvalidModel(f"These bytes are not an ONNX Runtime engine (not an ONNX model): {exc}") from exc
    meta = {prop.key: prop.value for prop in model.metadata_props}
    if meta.get(META_BACKEND) != NAME:
        raise InvalidModel(
            "These bytes are not an ONNX Runtime engine built by this service (no build record in the "
            "model's metadata); build one with backend 'onnxruntime'."
        )
    return meta


def _io_spec(arg: Any, profile: ShapeRange | None) -> IOSpec:
    element = str(arg.type).removeprefix("tensor(").removesuffix(")")
    shape = tuple(dim if isinstance(dim, int) else (dim or "?") for dim in arg.shape)
    return IOSpec(name=arg.name, dtype=_ORT_TYPES.get(element, element), shape=shape, profile=profile)


def _ort_errors(ort: ModuleType) -> tuple[type[BaseException], ...]:
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")  # fmt: skip
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


def _build_error(ort: ModuleType, exc: BaseException) -> ServiceError:
    state = ort.capi.onnxruntime_pybind11_state
    model_problems = tuple(
        getattr(state, name)
        for name in ("InvalidGraph", "InvalidArgument", "NotImplemented", "InvalidProtobuf")
    )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # ORT reports an unknown operator as a generic FAIL; it is still a property of the model.
    unknown_op = "not a registered function/op" in first_line or "No Op registered" in first_line
    if isinstance(exc, model_problems) or unknown_op:
        return InvalidModel(f"ONNX Runtime cannot load this model: {first_line}")
    return BuildFailed(f"ONNX Runtime failed to optimize this model: {first_line}")


def _module() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendUnavailable(f"ONNX Runtime is not installed (pip install onnxruntime): {exc}") from exc
    return onnxruntime
