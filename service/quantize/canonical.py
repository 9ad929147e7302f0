"""The canonical form every quantize step starts from (:func:`canonical_model`).

:func:`canonical_model` returns a copy of the input with the irregularities of real exports smoothed
out so the placement rules can be written once:

- every node has a unique name (unnamed nodes are named ``<op_type>_<first output>``, which survives
  opset conversion and BN folding; a repeated name gets a ``__<k>`` suffix), because skip lists,
  reports and TensorRT's ``[ONNX Layer: ...]`` metadata all refer to nodes by name;
- ``Constant`` nodes holding numbers become initializers and ``Identity`` nodes applied to a constant
  are bypassed (PaddlePaddle and older PyTorch exports feed weights that way), so "is this input a
  weight" is a dictionary lookup (:meth:`~service.onnx_graph.graph.GraphIndex.weight`);
- models of IR version < 4, which list every initializer as a graph input, stop doing so (an
  initializer still listed as an input afterwards is an overridable default, never a weight);
- the opset is raised to a minimum on request with ``onnx.version_converter``;
- subgraphs computed from constants only are folded into initializers (:func:`fold_constant_subgraphs`):
  exports that build weights with ``ConstantOfShape`` or reshape/transpose them in the graph (the ONNX
  model zoo's ``light_*`` graphs, some TensorFlow and Paddle exports) would otherwise have no weight
  to quantize, and TensorRT and ONNX Runtime fold them at build time anyway.

Questions about the result (producers, readers, weights) go to
:class:`~service.onnx_graph.graph.GraphIndex`; the rewrite helpers live in ``rewrite.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from service.errors import InvalidModel
from service.onnx_graph.subgraphs import names_read
from service.onnx_graph.values import constant_node_value
from service.quantize.rewrite import DEFAULT_DOMAINS, bypass_identities, remove_unused_initializers


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return int(entry.version)
    raise InvalidModel(
        "the model imports no version of the default ONNX operator set (opset_import is empty)"
    )


def with_opset_at_least(model: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """The model itself when its opset is high enough, else a converted copy.

    The converter's adapters rewrite ops whose signature changed (Clip bounds become inputs, Squeeze
    axes become an input, ...). Node and tensor names are kept, which calibration relies on: amax
    values collected on the original model still name the right tensors.
    """
    current = default_opset(model)
    if current >= minimum:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, minimum)
    except Exception as exc:  # the converter raises bare RuntimeError/ValueError subclasses per adapter
        raise InvalidModel(
            f"cannot upgrade the model from opset {current} to opset {minimum}, which Q/DQ placement "
            f"needs (per-channel DequantizeLinear): {exc}. Export the model at opset {minimum} or later."
        ) from exc
    converted.ir_version = max(converted.ir_version, _min_ir_version(minimum))
    return converted


def canonical_model(model: onnx.ModelProto, *, min_opset: int | None = None) -> onnx.ModelProto:
    """A canonical copy of ``model`` (see the module docstring); the input is left untouched."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _drop_initializer_inputs(work)
    _name_nodes(work.graph)
    if min_opset is not None:
        work = with_opset_at_least(work, min_opset)
        _name_nodes(work.graph)  # nodes the converter inserted
    _inline_constant_nodes(work.graph)
    _bypass_constant_identities(work.graph)
    fold_constant_subgraphs(work)
    return work


# Never folded: random ops differ run to run, and Q/DQ of a constant weight is how an explicitly
# quantized model states its weight quantization (folding it would hide that the model is quantized).
_UNFOLDABLE_OPS = frozenset(
    {
        "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
        "Bernoulli", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant",
    }
)  # fmt: skip
MAX_FOLDED_BYTES = 1 << 30  # protobuf caps a model at 2 GiB; beyond this, leave the subgraph to the runtime


def fold_constant_subgraphs(model: onnx.ModelProto) -> int:
    """Replace top-level nodes whose inputs are all constants by initializers; return how many went.

    The values are computed by ONNX Runtime on the CPU (``ORT_DISABLE_ALL``, so exactly the graph's
    ops): it is the runtime calibration already uses, it implements every standard op at every opset
    the service accepts, and it runs a weight-sized ``ConstantOfShape`` or ``Transpose`` natively,
    where ONNX's reference evaluator would take seconds in Python. Only the tensors the rest of the
    graph reads become initializers, under their own names. A subgraph ONNX Runtime cannot evaluate,
    or whose results exceed :data:`MAX_FOLDED_BYTES`, is left as it is: folding is an optimization,
    and the quantizer then reports that the layers behind it have no constant weight.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    known = {t.name for t in graph.initializer if t.name not in inputs}
    outputs = {o.name for o in graph.output}
    foldable: list[onnx.NodeProto] = []
    for node in graph.node:
        if (
            node.domain in DEFAULT_DOMAINS
            and node.op_type not in _UNFOLDABLE_OPS
            and node.input
            and all(not name or name in known for name in node.input)
            and not any(
                attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                for attr in node.attribute
            )
            and not any(out in outputs for out in node.output)
        ):
            foldable.append(node)
            known.update(out for out in node.output if out)
    if not foldable:
        return 0
    folded = {id(node) for node in foldable}
    still_read = names_read(graph, ignoring=foldable)
    wanted = [out for node in foldable for out in node.output if out and out in still_read]
    if not wanted:
        return 0  # dead constant nodes: not a quantization concern, the runtimes drop them
    values = _evaluate_constants(model, foldable, wanted)
    if values is None:
        return 0
    remaining = [node for node in graph.node if id(node) not in folded]
    del graph.node[:]
    graph.node.extend(remaining)
    graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in wanted)
    consumed = {name for node in foldable for name in node.input if name}
    remove_unused_initializers(graph, consumed)
    gone = {out for node in foldable for out in node.output} - set(wanted)
    info = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)
    return len(foldable)


def _evaluate_constants(
    model: onnx.ModelProto, nodes: list[onnx.NodeProto], wanted: list[str]
) -> dict[str, np.ndarray] | None:
    import onnxruntime as ort

    needed = {name for node in nodes for name in node.input if name}
    produced = {out for node in nodes for out in node.output}
    initializers = [t for t in model.graph.initializer if t.name in needed - produced]
    graph = helper.make_graph(
        list(nodes),
        "constant_subgraph",
        [],
        [helper.make_empty_tensor_value_info(n) for n in wanted],
        initializers,
    )
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    state = ort.capi.onnxruntime_pybind11_state
    kinds = (
        "Fail",
        "InvalidArgument",
        "InvalidGraph",
        "NotImplemented",
        "RuntimeException",
        "InvalidProtobuf",
    )
    errors = tuple(getattr(state, kind) for kind in kinds if hasattr(state, kind))
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = session.run(wanted, {})
    except errors:
        return None  # left to the runtime; see fold_constant_subgraphs
    values = {name: np.asarray(value) for name, value in zip(wanted, results, strict=True)}
    if sum(value.nbytes for value in values.values()) > MAX_FOLDED_BYTES:
        return None
    return values


def _min_ir_version(opset: int) -> int:
    return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True))


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    # IR < 4 requires every initializer to be listed as an input; from IR 4 on, listing one makes it an
    # overridable input, which is not what those old exporters meant. Normalize to the modern form.
    if model.ir_version >= 4:
        return
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializer_names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.ir_version = max(4, _min_ir_version(default_opset(model)))


def _name_nodes(graph: onnx.GraphProto) -> None:
    explicit = {n.name for n in graph.node if n.name}
    taken: set[str] = set()
    for node in graph.node:
        if node.name and node.name not in taken:
            taken.add(node.name)
            continue
        base = node.name or f"{node.op_type}_{next((o for o in node.output if o), 'node')}"
        name, k = base, 1
        while name in taken or name in explicit:
            k += 1
            name = f"{base}__{k}"
        node.name = name
        taken.add(name)


def _inline_constant_nodes(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output[0] not in outputs:
            value = constant_node_value(node)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _bypass_constant_identities(graph: onnx.GraphProto) -> None:
    inputs = {i.name for i in graph.input}
    constants = {t.name for t in graph.initializer if t.name not in inputs}
    bypass_identities(graph, lambda node: node.input[0] in constants)
