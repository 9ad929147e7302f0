"""What the TensorRT and TensorRT-RTX backends share.

The two libraries expose the same builder, parser and runtime API under different module names
(``tensorrt`` and ``tensorrt_rtx``), so every helper here takes the module as its first argument and
never imports either itself. The chain a build runs through:

``capturing_logger(trt, keep=...)`` -> ``network_from_onnx(...)`` -> ``builder_config(...)`` ->
``add_optimization_profile(...)`` -> ``engine_from_network(...)``

Errors are translated at this boundary: the ONNX parser's rejections become InvalidModel naming each
failing node and operator; a builder that returns no engine becomes BuildFailed carrying the
builder's error messages.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from service.backends.base import ShapeRange
from service.errors import BadInput, BuildFailed, InvalidModel

_SEVERITY_LETTER = {"INTERNAL_ERROR": "F", "ERROR": "E", "WARNING": "W", "INFO": "I", "VERBOSE": "V"}
_SEVERITY_RANK = {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4}
_LOGGER_CLASSES: dict[str, type] = {}
_LOGGER_CLASSES_LOCK = threading.Lock()


@dataclass(frozen=True)
class LogRecord:
    """One message a TensorRT library logged."""

    severity: str  # INTERNAL_ERROR, ERROR, WARNING, INFO or VERBOSE
    message: str

    def line(self) -> str:
        return f"[{_SEVERITY_LETTER.get(self.severity, '?')}] {self.message}"


def capturing_logger(trt: ModuleType, *, keep: str) -> Any:
    """A ``trt.ILogger`` that records the messages at ``keep`` severity or more severe in ``.records``.

    TensorRT hands a Python ``ILogger`` every message it produces, VERBOSE included, so the level is
    applied here, first thing: enterprise TensorRT builds log tens of thousands of VERBOSE tactic lines
    that must not be kept (use ``keep="WARNING"``); only TensorRT-RTX's builder needs VERBOSE, for its
    ``Layers:`` dump. The subclass is made once per library module because it must derive from that
    module's ``ILogger``.
    """
    limit = _SEVERITY_RANK[keep]
    with _LOGGER_CLASSES_LOCK:
        cls = _LOGGER_CLASSES.get(trt.__name__)
        if cls is None:

            class CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
                def __init__(self, limit: int) -> None:
                    # pybind11 trampolines need the base initialised explicitly.
                    trt.ILogger.__init__(self)
                    self.limit = limit
                    self.records: list[LogRecord] = []

                def log(self, severity: Any, msg: str) -> None:
                    if int(severity) > self.limit:  # Severity values rank like _SEVERITY_RANK
                        return
                    # list.append is atomic under the GIL; builder threads may log concurrently.
                    self.records.append(LogRecord(getattr(severity, "name", str(severity)), msg))

            cls = CapturingLogger
            _LOGGER_CLASSES[trt.__name__] = cls
    return cls(limit)


def log_text(records: Sequence[LogRecord], *, most_verbose: str = "INFO") -> str:
    """The records at ``most_verbose`` level or more severe, one line each."""
    limit = _SEVERITY_RANK[most_verbose]
    return "\n".join(r.line() for r in records if _SEVERITY_RANK.get(r.severity, 4) <= limit)


def error_messages(records: Sequence[LogRecord]) -> list[str]:
    return [r.message for r in records if r.severity in ("ERROR", "INTERNAL_ERROR")]


def network_flags(trt: ModuleType, *, strongly_typed: bool) -> int:
    """Network creation flags: explicit batch is implied since TensorRT 10; strongly typed on request."""
    if not strongly_typed:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def network_from_onnx(
    trt: ModuleType, builder: Any, logger: Any, model_bytes: bytes, *, strongly_typed: bool, label: str
) -> tuple[Any, Any]:
    """Parse ONNX bytes into a new network; returns ``(network, parser)``.

    Keep the parser alive until the engine is built: it owns the weight memory the network points to.
    """
    network = builder.create_network(network_flags(trt, strongly_typed=strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if parser.parse(model_bytes):
        return network, parser
    problems = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    summary = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    raise InvalidModel(
        f"{label}'s ONNX parser rejected the model: {summary or 'no reason given'}. "
        "Check that every operator and its attributes are supported by this backend, and for INT8 that "
        "Q/DQ nodes carry per-channel weight scales, zero points of 0 and float (not int32) biases.",
        details={"parser_errors": problems},
    )


def _parser_error(error: Any) -> str:
    node = getattr(error, "node_name", lambda: "")() or ""
    operator = getattr(error, "node_operator", lambda: "")() or ""
    where = f"node '{node}' ({operator})" if node else (f"a {operator} node" if operator else "the model")
    description = " | ".join(line.strip() for line in str(error.desc()).splitlines() if line.strip())
    return f"{where}: {description}"


def disable_tf32(trt: ModuleType, config: Any) -> str:
    """Clear ``BuilderFlag.TF32`` so FP32 layers compute in full FP32; returns the note for the build log.

    TensorRT sets TF32 by default, which on Ampere and later GPUs runs FP32 convolutions and matrix
    multiplies with 10-bit mantissas: an "fp32" engine would really be TF32.
    """
    config.clear_flag(trt.BuilderFlag.TF32)
    return "TF32 disabled (BuilderFlag.TF32 cleared): FP32 layers compute in full FP32"


def builder_config(trt: ModuleType, builder: Any, *, workspace_bytes: int | None) -> Any:
    """A builder config that records detailed layer information (needed for layer reports)."""
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_bytes is not None:
        if workspace_bytes <= 0:
            raise BadInput(f"The workspace limit must be positive, got {workspace_bytes} bytes.")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    return config


def add_optimization_profile(
    trt: ModuleType, builder: Any, config: Any, network: Any, ranges: Mapping[str, ShapeRange]
) -> Any | None:
    """Add one profile covering every dynamic network input; None when the network has none."""
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if _is_dynamic(network.get_input(i))]
    if not dynamic:
        return None
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        if tensor.is_shape_tensor:
            raise BadInput(
                f"Input '{tensor.name}' is a shape tensor (its values set output shapes); this service "
                "builds engines for data inputs only."
            )
        shape_range = ranges.get(tensor.name)
        if shape_range is None:
            raise BadInput(
                f"Input '{tensor.name}' has dynamic dimensions {list(tensor.shape)} in the parsed network "
                "but no shape range; pass shapes for it."
            )
        profile.set_shape(tensor.name, shape_range.min, shape_range.opt, shape_range.max)
    if config.add_optimization_profile(profile) < 0:
        raise BadInput(f"TensorRT rejected the optimization profile for inputs {[t.name for t in dynamic]}.")
    return profile


def _is_dynamic(tensor: Any) -> bool:
    return any(dim < 0 for dim in tuple(tensor.shape))


def engine_from_network(
    builder: Any, network: Any, config: Any, records: Sequence[LogRecord], label: str
) -> bytes:
    """Serialized engine bytes, or BuildFailed with the builder's own error messages."""
    try:
        serialized = builder.build_serialized_network(network, config)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BuildFailed(f"{label} failed while building the engine: {exc}") from exc
    if serialized is None:
        errors = error_messages(records)
        detail = " | ".join(errors[-5:]) if errors else "the builder logged no error"
        raise BuildFailed(
            f"{label} could not build an engine from this model: {detail}", details={"errors": errors}
        )
    return bytes(memoryview(serialized))
