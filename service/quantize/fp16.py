"""FP16 typing for strongly typed backends (TensorRT 11, TensorRT-RTX).

Contract: :func:`fp16_model_from` returns a copy of an FP32 or Q/DQ model in which every float layer
not in INT8 computes in FP16, graph inputs and outputs stay FP32 (a Cast at each boundary), and the
ops listed in ``keep_fp32_ops`` (by default :data:`DEFAULT_KEEP_FP32_OPS`) plus the nodes named in
``keep_fp32_nodes`` stay FP32 behind Casts. The result passes ``onnx.checker`` (full check) and runs
in ONNX Runtime; strongly typed builders take its types as the precision of each layer. The typing
itself is onnxconverter-common's ``convert_float_to_float16``; this module chooses what it blocks and
repairs what it gets wrong for these models: initializers shared by FP32 and FP16 readers, Cast
nodes, Q/DQ scales FP16 cannot hold, and FP32 graph outputs written by FP32-kept nodes (its own
``keep_io_types`` fails there; the boundary Casts are placed here instead).

Kept in FP32 by default, because FP16's 5-bit exponent and 11-bit mantissa break them:

- Softmax, LogSoftmax: exponentials and a sum over the class axis; small probabilities vanish.
- LayerNormalization, GroupNormalization, InstanceNormalization, MeanVarianceNormalization,
  LpNormalization: the variance squares activations (overflow above 256) and sums many of them.
- Every Reduce* op and GlobalAveragePool/GlobalLpPool: sums over extents that are usually dynamic
  (spatial dims), so a size rule could rarely decide; FP32 costs two casts around a memory-bound op.
- Exp, Log, Pow, Reciprocal, Softplus: overflow above exp(11) / 256**2 / 1/6e-5, underflow to -inf.

Always FP32, for correctness rather than numerics: Resize/Upsample (their scales/roi inputs must stay
float32 by schema) and the ops onnxconverter-common itself never converts (TopK, NonMaxSuppression,
RoiAlign, Range, CumSum, Min, Max and the ONNX-ML ops). A ``Cast(to=FLOAT)`` inside the FP16 region
becomes ``Cast(to=FLOAT16)``: the converter retypes its output but not its ``to`` attribute.

Q/DQ models (INT8/FP16 hybrids): QuantizeLinear and DequantizeLinear are converted too, so their
scales become FP16 and every DequantizeLinear outputs FP16 (its output type is its scale type): the
INT8 layers then read and write FP16 with no Cast inside the DequantizeLinear -> layer pattern
TensorRT fuses (measured on TensorRT-RTX 1.7: INT8 convolutions and GEMMs, GEMMs writing Half).
Keeping FP32 scales instead puts a Cast between every DQ and its layer. FP16 scales need opset 19,
so such models are upgraded with ``onnx.version_converter``. Scales that FP16 cannot hold exactly
(Q/DQ models made elsewhere; ours are already exact) are rounded up to the next FP16 value, and
constant INT8 weights behind a changed scale are requantized so the dequantized weights stay within
half a step of the originals.
TensorRT-RTX converts convolution scales back to FP32 internally (it warns so); GEMMs keep FP16.
Pass ``keep_fp32_ops`` including QuantizeLinear/DequantizeLinear to keep FP32 scales with Casts
around the Q/DQ instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from service.errors import BadInput, InvalidModel
from service.onnx_graph.graph import GraphIndex
from service.quantize.canonical import canonical_model, with_opset_at_least
from service.quantize.qdq import fp16_exact_scales
from service.quantize.rewrite import DEFAULT_DOMAINS, NameAllocator, int_attr, remove_unused_initializers

FP16_QDQ_MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear accept float16 scales from opset 19

DEFAULT_KEEP_FP32_OPS: frozenset[str] = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "MeanVarianceNormalization",
        "LpNormalization",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceMean",
        "ReduceProd",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceMax",
        "ReduceMin",
        "GlobalAveragePool",
        "GlobalLpPool",
        "Exp",
        "Log",
        "Pow",
        "Reciprocal",
        "Softplus",
    }
)
ALWAYS_FP32_OPS: frozenset[str] = frozenset({"Resize", "Upsample", *DEFAULT_OP_BLOCK_LIST})
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_INT_WEIGHT_TYPES: dict[int, type[np.integer]] = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}


def fp16_model_from(
    model: onnx.ModelProto,
    *,
    keep_fp32_ops: Collection[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: Collection[str] = (),
) -> onnx.ModelProto:
    """An FP16-typed copy of ``model`` with FP32 graph I/O (see the module docstring).

    Raises BadInput when ``keep_fp32_nodes`` names nodes the model lacks or the model is already
    FP16, and InvalidModel when the typed graph does not check (an op whose inputs have fixed types
    the converter does not know: keep that op type in FP32).
    """
    if isinstance(keep_fp32_ops, str) or isinstance(keep_fp32_nodes, str):
        raise BadInput("keep_fp32_ops and keep_fp32_nodes take collections of names, not one string")
    work = canonical_model(model)
    names = {n.name for n in work.graph.node}
    unknown = sorted(set(keep_fp32_nodes) - names)
    if unknown:
        raise BadInput(
            f"keep_fp32_nodes names nodes the model does not have: {', '.join(map(repr, unknown))}"
        )

    already = _fp16_evidence(work.graph)
    if already:
        raise BadInput(f"cannot type the model FP16: it already holds FP16 ({already}); give the FP32 model")

    has_qdq = any(n.op_type in _QDQ_OPS and n.domain in DEFAULT_DOMAINS for n in work.graph.node)
    blocked_ops = set(keep_fp32_ops) | ALWAYS_FP32_OPS
    blocked_nodes = set(keep_fp32_nodes)
    # The converter appends its own Casts while walking the blocked nodes; "Cast" as a blocked op type
    # would block those too and never terminate, so Casts are blocked by name, and only on request.
    if "Cast" in blocked_ops:
        blocked_ops.discard("Cast")
        blocked_nodes.update(n.name for n in work.graph.node if n.op_type == "Cast")
    # Retargeted after typing: a Cast(to=FLOAT16) before it would make shape inference type everything
    # downstream FP16 already, and the converter would then put no Cast after a kept-FP32 reader there.
    float_casts = _float_casts(work.graph, blocked_nodes)
    if has_qdq and not blocked_ops.issuperset(_QDQ_OPS):
        work = with_opset_at_least(work, FP16_QDQ_MIN_OPSET)
        _make_qdq_scales_fp16_exact(work.graph)
    _unshare_initializers(work.graph, blocked_ops, blocked_nodes)
    float_inputs = {v.name for v in work.graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    float_outputs = {v.name for v in work.graph.output if v.type.tensor_type.elem_type == TensorProto.FLOAT}

    try:
        with warnings.catch_warnings():
            # The converter warns per clamped value (|x| < 2**-24 or > 65504); the clamp is the intent.
            warnings.simplefilter("ignore", UserWarning)
            typed = convert_float_to_float16(
                work,
                min_positive_val=2.0**-24,
                max_finite_val=65504.0,
                keep_io_types=False,  # the boundary casts are ours, see _restore_fp32_io
                # _fp16_evidence ran instead: the converter's own test reads the first attribute of
                # every Cast as its target type, which is not a promise the schema makes.
                check_fp16_ready=False,
                op_block_list=sorted(blocked_ops),
                node_block_list=sorted(blocked_nodes),
            )
    except ValueError as exc:
        raise BadInput(f"cannot type the model FP16: {exc}") from exc
    _retarget_casts(typed.graph, float_casts)
    _restore_fp32_io(typed.graph, float_inputs, float_outputs)
    try:
        onnx.checker.check_model(typed, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidModel(
            f"FP16 typing produced an inconsistent graph: {exc}. Keep the op type named there in FP32 "
            "(keep_fp32_ops) and build again."
        ) from exc
    return typed


def _make_qdq_scales_fp16_exact(graph: onnx.GraphProto) -> None:
    """Round every Q/DQ scale up to an FP16 value; requantize constant weights behind changed scales."""
    index = GraphIndex(graph)
    names = NameAllocator(graph)
    rounded: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type not in _QDQ_OPS or node.domain not in DEFAULT_DOMAINS or len(node.input) < 2:
            continue
        scale_name = node.input[1]
        if scale_name in rounded or not index.is_weight(scale_name):
            continue
        if index.weight_type(scale_name) != TensorProto.FLOAT:
            continue
        original = index.weight_value(scale_name)
        exact = fp16_exact_scales(original)
        if not np.array_equal(exact, original):
            rounded[scale_name] = original

    if not rounded:
        return
    stale: set[str] = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[1] not in rounded:
            continue
        if not index.is_weight(node.input[0]) or index.weight_type(node.input[0]) not in _INT_WEIGHT_TYPES:
            continue
        if any(attr.name == "block_size" for attr in node.attribute):
            continue  # blocked INT4-style scales: left as given
        stale.add(node.input[0])
        node.input[0] = _requantized(node, index, names, graph, rounded[node.input[1]])
    for scale_name, original in rounded.items():
        replacement = numpy_helper.from_array(fp16_exact_scales(original), scale_name)
        index.weights[scale_name].CopyFrom(replacement)
    remove_unused_initializers(graph, stale)


def _requantized(
    node: onnx.NodeProto, index: GraphIndex, names: NameAllocator, graph: onnx.GraphProto, scale: np.ndarray
) -> str:
    """A new initializer holding the DQ's constant integers re-expressed on the FP16-exact scale."""
    values = index.weight_value(node.input[0])
    dtype = _INT_WEIGHT_TYPES[index.weight_type(node.input[0])]
    zero = (
        index.weight_value(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    )
    new_scale = fp16_exact_scales(scale).astype(np.float64)
    old_scale = scale.astype(np.float64)
    if old_scale.ndim == 1 and old_scale.size > 1:
        axis = int_attr(node, "axis", 1) % values.ndim
        shape = [-1 if a == axis else 1 for a in range(values.ndim)]
        old_scale, new_scale = old_scale.reshape(shape), new_scale.reshape(shape)
        zero = np.asarray(zero).reshape(shape) if np.ndim(zero) else zero
    real = (values.astype(np.float64) - zero) * old_scale
    info = np.iinfo(dtype)
    requantized = np.clip(np.rint(real / new_scale) + zero, info.min, info.max).astype(dtype)
    name = names.fresh(f"{node.input[0]}_fp16_scale")
    graph.initializer.append(numpy_helper.from_array(requantized, name))
    return name


def _restore_fp32_io(graph: onnx.GraphProto, float_inputs: set[str], float_outputs: set[str]) -> None:
    """Make the graph's float inputs and outputs FP32 again, with one Cast at each boundary.

    The converter's own ``keep_io_types`` handling fails on a blocked (FP32) node that produces a
    graph output, and routes FP32 inputs of blocked nodes through FP16. Here an FP32 value reaches an
    FP32 boundary directly (through an Identity), and only FP16 readers get a Cast.
    """
    index = GraphIndex(graph)
    names = NameAllocator(graph)
    types = _tensor_types(graph)
    prologue: list[onnx.NodeProto] = []
    epilogue: list[onnx.NodeProto] = []

    for value in graph.input:
        if value.name not in float_inputs:
            continue
        value.type.tensor_type.elem_type = TensorProto.FLOAT
        half_name = ""
        for reader in index.readers(value.name):
            if _is_cast_to(reader, TensorProto.FLOAT) and reader.input[0] == value.name:
                _make_identity(reader)  # the converter's FP16 -> FP32 cast for an FP32 reader
                continue
            if not half_name:
                half_name = names.fresh(f"{value.name}_fp16")
                prologue.append(
                    onnx.helper.make_node(
                        "Cast",
                        [value.name],
                        [half_name],
                        name=names.fresh(f"{value.name}_to_fp16"),
                        to=TensorProto.FLOAT16,
                    )
                )
            for i, name in enumerate(reader.input):
                if name == value.name:
                    reader.input[i] = half_name

    for value in graph.output:
        if value.name not in float_outputs:
            continue
        value.type.tensor_type.elem_type = TensorProto.FLOAT
        producer = index.producer(value.name)
        if producer is None:
            continue
        readers = index.readers(value.name)
        half_name = names.fresh(f"{value.name}_fp16")
        for reader in readers:
            for i, name in enumerate(reader.input):
                if name == value.name:
                    reader.input[i] = half_name
        source = producer.input[0] if producer.input else ""
        if _is_cast_to(producer, TensorProto.FLOAT16) and types.get(source) == TensorProto.FLOAT:
            # An FP32-kept producer: its FP32 value is the output; FP16 readers keep their cast.
            producer.output[0] = half_name
            epilogue.append(
                onnx.helper.make_node(
                    "Identity", [source], [value.name], name=names.fresh(f"{value.name}_fp32")
                )
            )
        else:
            producer.output[list(producer.output).index(value.name)] = half_name
            epilogue.append(
                onnx.helper.make_node(
                    "Cast",
                    [half_name],
                    [value.name],
                    name=names.fresh(f"{value.name}_to_fp32"),
                    to=TensorProto.FLOAT,
                )
            )
        for info in graph.value_info:
            if info.name == value.name:
                info.name = half_name

    nodes = prologue + list(graph.node) + epilogue
    del graph.node[:]
    graph.node.extend(nodes)


def _tensor_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: int(t.data_type) for t in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = int(value.type.tensor_type.elem_type)
    return types


def _is_cast_to(node: onnx.NodeProto, to: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)


def _make_identity(node: onnx.NodeProto) -> None:
    node.op_type = "Identity"
    del node.attribute[:]


def _fp16_evidence(graph: onnx.GraphProto) -> str:
    """What in ``graph`` is FP16 already (a named tensor or Cast), or "" when nothing is."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            return f"tensor {value.name!r}"
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT16:
            return f"initializer {tensor.name!r}"
    for node in graph.node:
        if node.op_type == "Cast" and int_attr(node, "to", TensorProto.UNDEFINED) == TensorProto.FLOAT16:
            return f"Cast node {node.name!r}"
    return ""


def _float_casts(graph: onnx.GraphProto, blocked_nodes: set[str]) -> set[str]:
    """Names of the model's own ``Cast(to=FLOAT)`` nodes that land inside the FP16 region."""
    return {
        node.name
        for node in graph.node
        if node.op_type == "Cast"
        and node.name not in blocked_nodes
        and int_attr(node, "to", TensorProto.UNDEFINED) == TensorProto.FLOAT
    }


def _retarget_casts(graph: onnx.GraphProto, names: set[str]) -> None:
    """Make the named Casts write FLOAT16: the converter retyped their outputs, not their ``to``."""
    for node in graph.node:
        if node.op_type != "Cast" or node.name not in names:
            continue
        for attr in node.attribute:
            if attr.name == "to":
                attr.i = TensorProto.FLOAT16


def _unshare_initializers(graph: onnx.GraphProto, blocked_ops: set[str], blocked_nodes: set[str]) -> None:
    """Give FP16 consumers their own copy of float initializers that FP32-kept nodes also read.

    The converter leaves an initializer FP32 when any blocked node reads it, which would hand FP32
    constants to the FP16 readers and break type consistency.
    """
    index = GraphIndex(graph)
    names = NameAllocator(graph)

    def blocked(node: onnx.NodeProto) -> bool:
        return node.op_type in blocked_ops or node.name in blocked_nodes

    for name, tensor in list(index.weights.items()):
        if tensor.data_type != TensorProto.FLOAT:
            continue
        readers = index.readers(name)
        fp16_readers = [n for n in readers if not blocked(n)]
        if not fp16_readers or len(fp16_readers) == len(readers):
            continue
        copy_name = names.fresh(f"{name}_fp16")
        duplicate = onnx.TensorProto()
        duplicate.CopyFrom(tensor)
        duplicate.name = copy_name
        graph.initializer.append(duplicate)
        for node in fp16_readers:
            for i, input_name in enumerate(node.input):
                if input_name == name:
                    node.input[i] = copy_name
