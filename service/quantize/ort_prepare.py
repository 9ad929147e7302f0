"""The FP32 graph rewritten the way ONNX Runtime would fuse it, before Q/DQ makes fusing impossible.

Contract: :func:`onnxruntime_prepared` returns a new canonical model (opset >= 13) that computes the
same outputs as the input (to float32 rounding), in which

- BatchNormalization after a convolution is folded into its weights (``bn_fold``);
- a per-channel constant ``Add`` after a Conv (how PaddlePaddle and some PyTorch exports carry the
  bias) becomes the Conv's bias;
- activation ``Identity`` nodes are bypassed (constant ones already are, see ``canonical.py``).

Why: on an FP32 model ORT's level-1 optimizer does all three itself. Once the weight sits behind a
DequantizeLinear it no longer does, and each of these nodes then splits a Conv from the Q that must
follow it, which keeps the whole node unit in float (``ort_placement.py``). Every rewrite keeps the
names of the tensors that remain (a folded Conv takes over its Add's or BatchNormalization's output
name, readers of an Identity read its input), so ranges collected on the model as uploaded still
name the right tensors.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from service.onnx_graph.graph import GraphIndex
from service.quantize._units import QDQ_MIN_OPSET
from service.quantize.bn_fold import fold_batchnorm
from service.quantize.canonical import canonical_model
from service.quantize.rewrite import (
    DEFAULT_DOMAINS,
    FLOAT_TYPES,
    NameAllocator,
    bypass_identities,
    remove_unused_initializers,
)


def onnxruntime_prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """The canonical model at opset >= 13 with the rewrites of the module docstring applied."""
    work = fold_batchnorm(canonical_model(model, min_opset=QDQ_MIN_OPSET))
    _bypass_activation_identities(work.graph)
    _fold_bias_adds(work.graph)
    onnx.checker.check_model(work)
    return work


def _bypass_activation_identities(graph: onnx.GraphProto) -> None:
    bypass_identities(graph, lambda node: True)


def _fold_bias_adds(graph: onnx.GraphProto) -> None:
    # Every decision reads the index of the graph as it was before this pass, although the loop
    # rewires convolutions: a Conv whose output just moved onto its Add is not seen again, so each
    # Conv absorbs at most one Add per pass. The caller's next step indexes the result afresh.
    index = GraphIndex(graph)
    names = NameAllocator(graph)
    folded: set[int] = set()
    stale: set[str] = set()
    for add in graph.node:
        site = _bias_add_site(add, index)
        if site is None:
            continue
        conv, constant = site
        bias = index.weight_value(constant).astype(np.float64).reshape(-1)
        if len(conv.input) > 2 and conv.input[2]:
            bias = bias + index.weight_value(conv.input[2]).astype(np.float64).reshape(-1)
            stale.add(conv.input[2])
        bias_name = names.fresh(f"{conv.name}.bias_from_{add.name}")
        graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        conv.output[0] = add.output[0]
        stale.add(constant)
        folded.add(id(add))
    if not folded:
        return
    remaining = [node for node in graph.node if id(node) not in folded]
    del graph.node[:]
    graph.node.extend(remaining)
    remove_unused_initializers(graph, stale)


def _bias_add_site(add: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto, str] | None:
    """(Conv, constant) when ``add`` adds one float32 constant per output channel to a Conv's output."""
    if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.input) != 2:
        return None
    for slot in (0, 1):
        activation, constant = add.input[slot], add.input[1 - slot]
        conv = index.producer(activation)
        if conv is None or conv.op_type != "Conv" or conv.domain not in DEFAULT_DOMAINS:
            continue
        if not index.is_weight(constant) or index.weight_type(constant) not in FLOAT_TYPES:
            continue
        if index.sole_reader(activation) is None:
            continue  # another reader needs the value without the bias
        if len(conv.input) < 2 or not index.is_weight(conv.input[1]):
            continue
        if len(conv.input) > 2 and conv.input[2] and not index.is_weight(conv.input[2]):
            continue
        channels = int(index.weight_value(conv.input[1]).shape[0])
        shape = index.weight_value(constant).shape
        if _per_channel(shape, channels, rank=len(index.weight_value(conv.input[1]).shape)):
            return conv, constant
    return None


def _per_channel(shape: tuple[int, ...], channels: int, *, rank: int) -> bool:
    """True when a constant of ``shape`` broadcasts against [N, C, spatial...] as one value per channel."""
    if len(shape) > rank or int(np.prod(shape, dtype=np.int64)) != channels:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)  # numpy broadcasting aligns trailing axes
    return padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)
