"""Triton Inference Server model repositories made from cached engines.

:func:`export_for_triton` writes a ``.tar.gz`` holding one model directory, ready to unpack into a
Triton ``--model-repository``::

    <name>/config.pbtxt
    <name>/1/model.plan    TensorRT and TensorRT-RTX engines: platform "tensorrt_plan", KIND_GPU
    <name>/1/model.onnx    ONNX Runtime engines: platform "onnxruntime_onnx", KIND_CPU

The config is derived from the engine, never guessed. Tensor names and types come from the exact
ONNX that was handed to the builder. Batching follows the engine's optimization profile (the build's
shape ranges; TensorRT builders fill a batch-1 range for a dynamic batch axis nobody gave a range for):
when the first dimension is dynamic in every input and output and the profile admits batch 1 up to
some B > 1, the config has ``max_batch_size: B``, ``dynamic_batching`` and dims without the batch
axis; otherwise ``max_batch_size: 0`` and full dims. A dynamic dim is -1, unless the profile pins it
(min == max), where the engine accepts that one size only. ONNX Runtime accepts any shape, so an ONNX
Runtime engine built without ranges has no batch bound and gets no batching config.

The text is checked against Triton's own ``ModelConfig`` protobuf schema in the tests (tritonclient
ships it). It is not imported here: tritonclient pins protobuf and ml_dtypes below what onnx uses,
and the config is generated from typed values, so a run-time parse would only re-check this module.
"""

from __future__ import annotations

import os
import re
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Literal

from service.backends.base import ShapeRange
from service.backends.capabilities import capabilities_of
from service.backends.shapes import shape_ranges_for
from service.catalog.engines import EngineCache, EngineRecord
from service.catalog.models import ModelCatalog
from service.errors import BadInput, Conflict, NotFound
from service.onnx_graph.inspect import TensorSpec

MODEL_VERSION = "1"
DATA_TYPES: Mapping[str, str] = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
    "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64",
    "bool": "TYPE_BOOL", "object": "TYPE_STRING",
}  # fmt: skip
# Triton's onnxruntime backend maps graph level 2 to ORT_DISABLE_ALL: the engine is ONNX Runtime's
# already-optimized graph (CPU-specific fused operators), as the service's own runner opens it.
ORT_GRAPH_LEVEL_DISABLE_ALL = 2
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TEMP_PREFIX = ".triton-"
_STALE_EXPORT_S = 3600
# Engine weights barely compress; level 1 costs a fraction of the default's time for nearly its size.
_GZIP_LEVEL = 1


@dataclass(frozen=True)
class _Platform:
    platform: Literal["tensorrt_plan", "onnxruntime_onnx"]
    model_file: str
    instance_kind: Literal["KIND_GPU", "KIND_CPU"]


_PLATFORMS: Mapping[str, _Platform] = {
    ".plan": _Platform("tensorrt_plan", "model.plan", "KIND_GPU"),
    ".onnx": _Platform("onnxruntime_onnx", "model.onnx", "KIND_CPU"),
}


@dataclass(frozen=True)
class TritonTensor:
    """One ``input`` or ``output`` entry. ``reshape`` is set where the model's tensor has no dims left
    (a scalar, or a batch-only tensor under batching): Triton wants ``dims: [1]`` plus an empty reshape."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TritonModelConfig:
    """A Triton model configuration, rendered by :meth:`to_pbtxt`."""

    name: str
    platform: Literal["tensorrt_plan", "onnxruntime_onnx"]
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    instance_kind: Literal["KIND_GPU", "KIND_CPU"]
    graph_optimization_level: int | None = None
    notes: tuple[str, ...] = ()  # written as comments above the config

    @property
    def dynamic_batching(self) -> bool:
        return self.max_batch_size > 0

    @property
    def model_file(self) -> str:
        """The file Triton looks for in the version directory."""
        return "model.plan" if self.platform == "tensorrt_plan" else "model.onnx"

    def to_pbtxt(self) -> str:
        lines = [f"# {note}" for note in self.notes]
        lines += [
            f"name: {_quote(self.name)}",
            f"platform: {_quote(self.platform)}",
            f"max_batch_size: {self.max_batch_size}",
        ]
        lines += _tensor_block("input", self.inputs)
        lines += _tensor_block("output", self.outputs)
        lines += ["instance_group [", "  {", "    count: 1", f"    kind: {self.instance_kind}", "  }", "]"]
        if self.dynamic_batching:
            lines.append("dynamic_batching { }")
        if self.graph_optimization_level is not None:
            lines.append(f"optimization {{ graph {{ level: {self.graph_optimization_level} }} }}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TritonExport:
    """A written model-repository archive."""

    path: Path  # the .tar.gz, a temporary file the caller removes once it is sent
    filename: str  # "<name>.tar.gz", for Content-Disposition
    config: TritonModelConfig
    members: tuple[str, ...]  # the archive's file paths
    size_bytes: int


def _quote(text: str) -> str:
    """A protobuf text-format string literal (non-ASCII as octal-escaped UTF-8 bytes)."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensor_block(field: str, tensors: Sequence[TritonTensor]) -> list[str]:
    lines = [f"{field} ["]
    for index, tensor in enumerate(tensors):
        lines += [
            "  {",
            f"    name: {_quote(tensor.name)}",
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {', '.join(str(d) for d in tensor.dims)} ]",
        ]
        if tensor.reshape is not None:
            lines.append(f"    reshape: {{ shape: [ {', '.join(str(d) for d in tensor.reshape)} ] }}")
        lines.append("  }," if index < len(tensors) - 1 else "  }")
    lines.append("]")
    return lines


def triton_data_type(spec: TensorSpec) -> str:
    """Triton's ``TYPE_*`` name for a tensor's numpy dtype."""
    data_type = DATA_TYPES.get(spec.dtype)
    if data_type is None:
        raise Conflict(
            f"Tensor '{spec.name}' has element type '{spec.dtype}', which Triton has no data type for; "
            f"Triton takes {', '.join(sorted(DATA_TYPES))}."
        )
    return data_type


def check_model_name(name: str) -> str:
    """A caller-chosen model name, used as the repository directory: refused rather than altered."""
    if not MODEL_NAME.fullmatch(name):
        raise BadInput(
            f"Triton model name {name!r} is not usable as a model directory: use 1-128 letters, digits, "
            "'_', '.' or '-', starting with a letter or digit."
        )
    return name


def default_model_name(source_name: str | None, record: EngineRecord) -> str:
    """``<model file stem>_<precision>_<backend>``, reduced to the characters Triton names allow."""
    stem = Path(source_name).stem if source_name else ""
    raw = f"{stem}_{record.precision}_{record.backend}" if stem else f"engine_{record.id[:12]}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).lstrip("._-")[:128]
    return name if MODEL_NAME.fullmatch(name) else f"engine_{record.id[:12]}"


def _is_dynamic(dim: int | str) -> bool:
    return not isinstance(dim, int) or dim < 0


def _batch_size(
    inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], ranges: Mapping[str, ShapeRange]
) -> tuple[int, str]:
    """``max_batch_size`` for the config and the reason, in words, for the config's comments."""
    fixed = [spec.name for spec in (*inputs, *outputs) if not spec.shape or not _is_dynamic(spec.shape[0])]
    if fixed:
        return 0, f"no batching: the first dimension is not dynamic in {', '.join(fixed)}"
    bounds = []
    for spec in inputs:
        shape_range = ranges.get(spec.name)
        if shape_range is None:
            continue  # ONNX Runtime: no range given, any batch runs
        if shape_range.min[0] > 1:
            least = shape_range.min[0]
            return 0, f"no batching: input '{spec.name}' needs batch >= {least}; Triton batches from 1"
        bounds.append(shape_range.max[0])
    if not bounds:
        return 0, (
            "no batching: no shape range bounds the batch (the engine accepts any); build with a shape "
            "range to export a batching config"
        )
    largest = min(bounds)
    if largest <= 1:
        return 0, "no batching: the engine's optimization profile allows batch 1 only"
    return largest, f"batching: the engine's optimization profile allows batch 1 to {largest}"


def _tensor(spec: TensorSpec, shape_range: ShapeRange | None, *, batched: bool) -> TritonTensor:
    dims = []
    for axis, dim in enumerate(spec.shape):
        if batched and axis == 0:
            continue
        if not _is_dynamic(dim):
            dims.append(int(dim))
        elif shape_range is not None and shape_range.min[axis] == shape_range.max[axis]:
            dims.append(shape_range.min[axis])  # the profile pins this axis: the engine takes one size
        else:
            dims.append(-1)
    if not dims:
        return TritonTensor(spec.name, triton_data_type(spec), (1,), reshape=())
    return TritonTensor(spec.name, triton_data_type(spec), tuple(dims))


def triton_config_for(
    record: EngineRecord, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], name: str
) -> TritonModelConfig:
    """The config for an engine whose built ONNX has ``inputs`` and ``outputs``."""
    platform = _PLATFORMS.get(record.file_extension)
    if platform is None:
        raise Conflict(
            f"Engine {record.id} is a '{record.file_extension}' file from backend '{record.backend}'; Triton "
            "export knows TensorRT plans (.plan) and ONNX Runtime models (.onnx)."
        )
    # TensorRT builders fill a batch-1 profile for a dynamic batch axis without a range (see
    # service.backends.shapes); ONNX Runtime takes any shape, so only the given ranges bound it.
    ranges, _ = shape_ranges_for(
        inputs, record.build_config.shape_map(), complete=record.file_extension == ".plan"
    )
    max_batch, batching_note = _batch_size(inputs, outputs, ranges)
    batched = max_batch > 0
    return TritonModelConfig(
        name=name,
        platform=platform.platform,
        max_batch_size=max_batch,
        inputs=tuple(_tensor(spec, ranges.get(spec.name), batched=batched) for spec in inputs),
        outputs=tuple(_tensor(spec, None, batched=batched) for spec in outputs),
        instance_kind=platform.instance_kind,
        graph_optimization_level=ORT_GRAPH_LEVEL_DISABLE_ALL
        if platform.platform == "onnxruntime_onnx"
        else None,
        notes=(*_provenance_notes(record), batching_note),
    )


def _provenance_notes(record: EngineRecord) -> tuple[str, ...]:
    built = (
        f"Exported by engine-service from engine {record.id}: {record.precision} engine built by "
        f"{record.backend} {record.backend_version} for {record.device}."
    )
    if not capabilities_of(record.backend).loads_in_stock_triton:
        runtime = (
            f"This is a TensorRT-RTX plan: it loads only with the TensorRT-RTX {record.backend_version} "
            "runtime, on the GPUs it targets. Triton's stock TensorRT backend links enterprise TensorRT "
            "and cannot load it; serve it with a TensorRT backend built against TensorRT-RTX, or build "
            "the engine with backend 'tensorrt' for stock Triton."
        )
    elif record.file_extension == ".plan":
        runtime = (
            f"TensorRT plans load only with the TensorRT version that built them ({record.backend_version}): "
            "use a Triton release whose TensorRT backend links that version, on the same GPU model."
        )
    else:
        runtime = (
            f"Saved by ONNX Runtime {record.backend_version} with CPU-specific fused operators: Triton's "
            "onnxruntime backend must use that version; graph level 2 keeps it from re-optimizing the graph."
        )
    return built, runtime


def engine_io(
    models: ModelCatalog, record: EngineRecord
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of the ONNX the engine was built from (TensorRT takes its I/O from it).

    The catalog admits only models that pass the ONNX checker, which requires a shape on every graph
    output, so an empty shape here is a scalar, not an unknown rank.
    """
    try:
        info = models.get(record.built_model_id).info
    except NotFound as exc:
        raise Conflict(
            f"The ONNX model engine {record.id} was built from is no longer stored, so its inputs and "
            "outputs are unknown; build the engine again to export it."
        ) from exc
    return info.inputs, info.outputs


def write_repository_archive(
    config: TritonModelConfig, model_path: Path, destination: Path
) -> tuple[str, ...]:
    """Write ``<name>/config.pbtxt`` and ``<name>/1/<model file>`` into a .tar.gz; returns the members."""
    root = config.name
    config_member, model_member = f"{root}/config.pbtxt", f"{root}/{MODEL_VERSION}/{config.model_file}"
    now = time.time()
    with tarfile.open(destination, "w:gz", compresslevel=_GZIP_LEVEL) as archive:
        for directory in (root, f"{root}/{MODEL_VERSION}"):
            archive.addfile(_member(directory, 0, now, directory=True))
        text = config.to_pbtxt().encode()
        archive.addfile(_member(config_member, len(text), now), BytesIO(text))
        with model_path.open("rb") as model:
            archive.addfile(_member(model_member, model_path.stat().st_size, now), model)
    return config_member, model_member


def _member(name: str, size: int, mtime: float, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.size = size
    info.mtime = int(mtime)
    return info


def export_for_triton(
    engines: EngineCache, models: ModelCatalog, engine_id: str, *, name: str | None, workdir: Path
) -> TritonExport:
    """Write the Triton model repository of ``engine_id`` into a temporary archive under ``workdir``."""
    record = engines.get(engine_id)
    if name is not None:
        model_name = check_model_name(name)
    else:
        try:
            source_name: str | None = models.get(record.model_id).name
        except NotFound:
            source_name = None
        model_name = default_model_name(source_name, record)
    inputs, outputs = engine_io(models, record)
    config = triton_config_for(record, inputs, outputs, model_name)
    model_path = engines.verified_plan_path(record.id)  # a damaged plan is dropped, never exported
    workdir.mkdir(parents=True, exist_ok=True)
    _sweep_stale(workdir)
    fd, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".tar.gz", dir=workdir)
    os.close(fd)
    path = Path(temp)
    try:
        members = write_repository_archive(config, model_path, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return TritonExport(
        path=path,
        filename=f"{model_name}.tar.gz",
        config=config,
        members=members,
        size_bytes=path.stat().st_size,
    )


def _sweep_stale(workdir: Path) -> None:
    """Remove archives an interrupted response left behind (normally each is deleted once sent)."""
    cutoff = time.time() - _STALE_EXPORT_S
    for leftover in workdir.glob(f"{_TEMP_PREFIX}*"):
        with suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
