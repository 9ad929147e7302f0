"""Layer reports parsed from what each backend exposes about a built engine.

Three sources, one result type (:class:`LayerReport`):

``layer_report_from_builder_log(lines)``
    TensorRT-RTX's ``Layers:`` dump, printed by its builder with a VERBOSE logger and
    ``ProfilingVerbosity.DETAILED``. One line per engine layer::

        Name: <layer>, LayerType: <type>, Inputs: [ { Name: .., Dimensions: [..], Datatype: Int8, .. }],
        Constants: [ .. ], Outputs: [ .. ], TacticName: .., StreamId: 0,
        Metadata: [ONNX Layer: conv1][ONNX Layer: bn1]          (all on one line)

``layer_report_from_inspector_json(text)``
    Enterprise TensorRT's ``IEngineInspector`` JSON (``LayerInformationFormat.JSON``, DETAILED): a
    ``Layers`` list of objects with ``Name``, ``LayerType``, ``Inputs``/``Outputs`` (each with a
    ``Format/Datatype`` string such as ``"Row major linear FP32"``, ``"Half"`` or ``"Thirty-two wide
    channel vectorized row major Int8 format."``) and ``Metadata`` holding ``[ONNX Layer: <node>]``
    entries separated by ``\\x1e`` or ``\\x1f``.

``layer_report_from_optimized_graph(optimized, original)``
    ONNX Runtime's saved optimized model: one layer per node (see :mod:`service.backends.ort_provenance`
    for how fused nodes are traced back to the original nodes).

**Precision rule** (the same for every source, :func:`precision_from_dtypes`): a layer computes in the
type of its *inputs* (activations, not weights/constants): a convolution fed Int8 is an INT8
convolution whatever it outputs, and a quantizing pointwise layer fed Float and writing Int8 computes
in FP32. Layers without inputs (constant generators) use their outputs. Index and boolean types (int32,
int64, bool: gather indices, masks, shapes) are ignored when a numeric type is present. int8/uint8 ->
``int8``, fp16 -> ``fp16``, fp32 -> ``fp32``; several of these -> ``mixed``; none (synchronisation
layers, bf16/fp8) -> ``other``. ONNX Runtime's integer operators (QLinear*, *Integer) are ``int8``.

**Reformat rule**: ``is_reformat`` marks layers that only move or convert data: TensorRT ``Reformat``/
``NoOp``/``Shuffle``/``Cast`` layers and ``Reformatting CopyNode`` layers; Myelin kernels (``__myl_*``)
whose fused-op name tokens are all data movement (Move, Repl, Tran, Cast, Copy, Resh, Conc, Slic);
ONNX Runtime's Q/DQ, Cast, layout (Reorder*, Transpose) and shape-only nodes.

Every parser takes the ONNX node names of the model that was built (optional) and reports the ones no
layer names in ``unmapped_nodes``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import onnx
from onnx import TensorProto, helper

from service.backends import ort_provenance
from service.backends.base import EngineLayer, LayerPrecision, LayerReport
from service.errors import BuildFailed

ReportSource = Literal["builder_log", "engine_inspector", "optimized_graph"]

_DTYPE_WORDS = {
    "int8": "int8",
    "uint8": "uint8",
    "half": "fp16",
    "fp16": "fp16",
    "float16": "fp16",
    "float": "fp32",
    "fp32": "fp32",
    "float32": "fp32",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "int32": "int32",
    "int64": "int64",
    "bool": "bool",
    "fp8": "fp8",
    "int4": "int4",
    "fp4": "fp4",
    "double": "fp64",
    "float64": "fp64",
}
_PRECISION_OF_DTYPE: dict[str, LayerPrecision] = {
    "int8": "int8",
    "uint8": "int8",
    "fp16": "fp16",
    "fp32": "fp32",
}
_INDEX_DTYPES = frozenset({"int32", "int64", "bool"})

_MOVE_TOKENS = frozenset({"Move", "Repl", "Tran", "Cast", "Copy", "Resh", "Conc", "Slic"})
_TRT_REFORMAT_TYPES = frozenset({"reformat", "noop", "shuffle", "cast", "copy"})

_LAYER_LINE = re.compile(r"Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),")
_DATATYPE = re.compile(r"Datatype: (\w+)")
# A node name may contain ']' (rarely): an entry ends only before the next entry, a separator or the end.
_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)\](?=\s*\[ONNX Layer: |[\x1e\x1f]|\s*$)")
_MYELIN_NAME = re.compile(r"__myl_([A-Za-z0-9]+?)_myl")


def normalize_dtype(raw: str) -> str:
    """A backend's datatype or format string as a short name: fp32, fp16, int8, uint8, bf16, int32, ...

    Format strings are scanned word by word (``"Row major linear FP32"`` -> ``fp32``); text naming no
    known type (``"N/A due to dynamic shapes"``) gives ``"unknown"``.
    """
    for word in re.findall(r"[a-z0-9]+", raw.lower()):
        if word in _DTYPE_WORDS:
            return _DTYPE_WORDS[word]
    return "unknown"


def precision_from_dtypes(input_dtypes: Sequence[str], output_dtypes: Sequence[str] = ()) -> LayerPrecision:
    """The layer's compute precision by the module's rule (inputs first, index types ignored)."""
    dtypes = list(input_dtypes) or list(output_dtypes)
    numeric = [d for d in dtypes if d not in _INDEX_DTYPES]
    precisions = {_PRECISION_OF_DTYPE.get(d, "other") for d in numeric}
    if not precisions:
        return "other"
    if len(precisions) == 1:
        return next(iter(precisions))
    return "mixed"


def onnx_nodes_from_metadata(metadata: str) -> tuple[str, ...]:
    """The node names in ``[ONNX Layer: <name>]`` metadata, in order, without repeats."""
    return _unique(match.group(1) for match in _ONNX_LAYER.finditer(metadata.strip()))


def myelin_op_tokens(layer_name: str) -> tuple[str, ...]:
    """Fused-op tokens of a Myelin kernel name: ``__myl_CorrMulAddRelu_myl0_1`` -> Corr, Mul, Add, Relu."""
    match = _MYELIN_NAME.search(layer_name)
    return tuple(re.findall(r"[A-Z][a-z0-9]*", match.group(1))) if match else ()


def is_reformat_layer(name: str, layer_type: str) -> bool:
    if layer_type.strip().lower() in _TRT_REFORMAT_TYPES or name.startswith("Reformatting CopyNode"):
        return True
    tokens = myelin_op_tokens(name)
    return bool(tokens) and all(token in _MOVE_TOKENS for token in tokens)


def with_unmapped(
    layers: Sequence[EngineLayer], source: ReportSource, node_names: Sequence[str] | None
) -> LayerReport:
    """A report whose ``unmapped_nodes`` lists the model's nodes that no layer names (model order)."""
    mapped = {node for layer in layers for node in layer.onnx_nodes}
    unmapped = tuple(name for name in _unique(node_names or ()) if name and name not in mapped)
    return LayerReport(layers=tuple(layers), source=source, unmapped_nodes=unmapped)


# --- TensorRT-RTX builder log ------------------------------------------------------------------------


def layer_report_from_builder_log(
    lines: Iterable[str], node_names: Sequence[str] | None = None
) -> LayerReport:
    """Parse the builder's last ``Layers:`` dump; ``lines`` may hold whole multi-line log messages."""
    flat = [line for chunk in lines for line in chunk.splitlines()]
    starts = [index for index, line in enumerate(flat) if line.rstrip().endswith("Layers:")]
    layers: list[EngineLayer] = []
    for line in flat[starts[-1] + 1 if starts else 0 :]:
        match = _LAYER_LINE.search(line)
        if match is None:
            if layers and line.strip().startswith("I/O Tensors:"):
                break
            continue
        layers.append(_builder_layer(line, match))
    return with_unmapped(layers, "builder_log", node_names)


def _builder_layer(line: str, match: re.Match[str]) -> EngineLayer:
    name, layer_type = match.group("name").strip(), match.group("type").strip()
    inputs, position = _bracketed(line, "Inputs", match.end())
    _, position = _bracketed(line, "Constants", position)
    outputs, position = _bracketed(line, "Outputs", position)
    meta_at = line.find(", Metadata:", position)
    metadata = line[meta_at + len(", Metadata:") :] if meta_at >= 0 else ""
    input_dtypes = tuple(normalize_dtype(d) for d in _DATATYPE.findall(inputs))
    output_dtypes = tuple(normalize_dtype(d) for d in _DATATYPE.findall(outputs))
    return EngineLayer(
        name=name,
        type=layer_type,
        precision=precision_from_dtypes(input_dtypes, output_dtypes),
        input_dtypes=input_dtypes,
        output_dtypes=output_dtypes,
        onnx_nodes=onnx_nodes_from_metadata(metadata),
        is_reformat=is_reformat_layer(name, layer_type),
    )


def _bracketed(line: str, label: str, start: int) -> tuple[str, int]:
    """The text inside ``<label>: [ ... ]`` found at or after ``start`` (brackets balanced)."""
    at = line.find(f"{label}: [", start)
    if at < 0:
        return "", start
    open_at = at + len(label) + 2
    depth = 0
    for index in range(open_at, len(line)):
        if line[index] == "[":
            depth += 1
        elif line[index] == "]":
            depth -= 1
            if depth == 0:
                return line[open_at + 1 : index], index + 1
    return line[open_at + 1 :], len(line)  # unbalanced (a bracket inside a name): take the rest


# --- enterprise TensorRT engine inspector --------------------------------------------------------------


def layer_report_from_inspector_json(text: str, node_names: Sequence[str] | None = None) -> LayerReport:
    """Parse ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BuildFailed(f"The TensorRT engine inspector returned text that is not JSON: {exc}") from exc
    entries = data.get("Layers", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise BuildFailed("The TensorRT engine inspector's JSON has no 'Layers' list.")
    known = set(node_names) if node_names is not None else None
    return with_unmapped(
        [_inspector_layer(entry, known) for entry in entries], "engine_inspector", node_names
    )


def _inspector_layer(entry: object, known_nodes: set[str] | None) -> EngineLayer:
    if isinstance(entry, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY: names and nothing else
        return EngineLayer(
            name=entry,
            type="unknown",
            precision="other",
            onnx_nodes=_nodes_from_layer_name(entry, known_nodes),
            is_reformat=entry.startswith("Reformatting CopyNode"),
        )
    if not isinstance(entry, dict):
        raise BuildFailed(f"Unexpected layer entry in the TensorRT engine inspector's JSON: {entry!r:.200}")
    name = str(entry.get("Name", ""))
    layer_type = str(entry.get("LayerType", "unknown"))
    input_dtypes = tuple(_tensor_dtype(tensor) for tensor in entry.get("Inputs", []))
    output_dtypes = tuple(_tensor_dtype(tensor) for tensor in entry.get("Outputs", []))
    metadata = str(entry.get("Metadata", ""))
    nodes = onnx_nodes_from_metadata(metadata) if metadata else _nodes_from_layer_name(name, known_nodes)
    return EngineLayer(
        name=name,
        type=layer_type,
        precision=precision_from_dtypes(input_dtypes, output_dtypes),
        input_dtypes=input_dtypes,
        output_dtypes=output_dtypes,
        onnx_nodes=nodes,
        is_reformat=is_reformat_layer(name, layer_type),
    )


def _tensor_dtype(tensor: object) -> str:
    if isinstance(tensor, dict):
        return normalize_dtype(str(tensor.get("Format/Datatype", tensor.get("Datatype", ""))))
    return "unknown"


def _nodes_from_layer_name(name: str, known_nodes: set[str] | None) -> tuple[str, ...]:
    """Without metadata, TensorRT names a fused layer "<node> + <node> + ..." after its network layers,
    which the ONNX parser names after the nodes; only parts that are real node names are kept."""
    if known_nodes is None:
        return ()
    return _unique(part.strip() for part in name.split(" + ") if part.strip() in known_nodes)


# --- ONNX Runtime optimized graph ------------------------------------------------------------------------

_ORT_REFORMAT_OPS = frozenset(
    {
        "Cast", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ReorderInput",
        "ReorderOutput", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Concat",
        "Slice",
    }
)  # fmt: skip


def layer_report_from_optimized_graph(
    optimized: onnx.ModelProto, original: onnx.ModelProto | None = None
) -> LayerReport:
    """One layer per node of ONNX Runtime's optimized model.

    With ``original`` (the model handed to ONNX Runtime), each layer's ``onnx_nodes`` are the original
    nodes it was derived from (:mod:`service.backends.ort_provenance`) and ``unmapped_nodes`` lists the
    rest; without it, a layer names only the node whose name it kept, and nothing is reported unmapped.
    """
    graph = optimized.graph
    types = ort_provenance.tensor_types(graph)
    constants = {init.name for init in graph.initializer}
    if original is not None:
        node_origins = ort_provenance.origins(graph, original.graph)
    else:
        node_origins = [(node.name,) if node.name else () for node in graph.node]
    layers = []
    for node, nodes in zip(graph.node, node_origins, strict=True):
        input_dtypes = tuple(
            _onnx_dtype(types.get(name, 0)) for name in node.input if name and name not in constants
        )
        output_dtypes = tuple(_onnx_dtype(types.get(name, 0)) for name in node.output if name)
        precision: LayerPrecision = (
            "int8"
            if node.op_type in ort_provenance.INTEGER_OPS
            else precision_from_dtypes(input_dtypes, output_dtypes)
        )
        layers.append(
            EngineLayer(
                name=node.name or f"{node.op_type}:{node.output[0] if node.output else ''}",
                type=node.op_type,
                precision=precision,
                input_dtypes=input_dtypes,
                output_dtypes=output_dtypes,
                onnx_nodes=nodes,
                is_reformat=node.op_type in _ORT_REFORMAT_OPS,
            )
        )
    node_names = [node.name for node in original.graph.node] if original is not None else None
    return with_unmapped(layers, "optimized_graph", node_names)


def _onnx_dtype(elem_type: int) -> str:
    if not elem_type:
        return "unknown"
    try:
        return normalize_dtype(helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError):  # element types numpy has no dtype for (float8 variants, strings)
        return normalize_dtype(TensorProto.DataType.Name(elem_type))


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
