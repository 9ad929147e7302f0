"""Fold inference-mode BatchNormalization into the convolution in front of it.

Contract: ``fold_batchnorm(model)`` returns a new, valid model in which every foldable
BatchNormalization is gone and its Conv/ConvTranspose carries new weight and bias initializers
``W' = W * s`` and ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel.
The convolution takes over the BatchNormalization's output name, so consumers and graph outputs are
unchanged; outputs agree with the original to float32 rounding (about 1e-6 relative).

A BatchNormalization is left in place, with the reason recorded by :func:`batchnorm_folding`, when
folding would change what the graph computes or is not expressible: its parameters or the convolution's
weights are not constants, the convolution's output is read by anything else (another consumer or a
graph output), it runs in training mode or exposes its running-statistics outputs, or it is a
pre-opset-9 non-spatial BatchNormalization. The input model is never modified; like every quantize step
the result is canonical (unique node names, Constant nodes as initializers, see ``canonical.py``).

Folding is what TensorRT does itself at build time; doing it in the ONNX keeps the weights the
quantizer sees equal to the weights TensorRT multiplies, so per-channel weight scales are computed on
the folded values (quantizing W and then multiplying by a per-channel s would be equivalent, but only
if every tool agreed to do it in that order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from service.onnx_graph.graph import GraphIndex
from service.quantize.canonical import canonical_model
from service.quantize.rewrite import (
    DEFAULT_DOMAINS,
    FLOAT_TYPES,
    NameAllocator,
    float_attr,
    int_attr,
    remove_unused_initializers,
)

_CONV_OPS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class FoldedBatchNorm:
    """One BatchNormalization folded into the convolution before it."""

    batchnorm: str
    conv: str


@dataclass(frozen=True)
class KeptBatchNorm:
    """One BatchNormalization left in the graph, and why."""

    batchnorm: str
    reason: str


@dataclass(frozen=True)
class BatchNormFolding:
    """The folded model and what happened to each BatchNormalization."""

    model: onnx.ModelProto
    folded: tuple[FoldedBatchNorm, ...]
    kept: tuple[KeptBatchNorm, ...]


@dataclass(frozen=True)
class _FoldSite:
    bn: onnx.NodeProto
    conv: onnx.NodeProto


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every foldable BatchNormalization folded (see the module docstring)."""
    return batchnorm_folding(model).model


def batchnorm_folding(model: onnx.ModelProto) -> BatchNormFolding:
    """Fold what can be folded and say, per BatchNormalization, what happened."""
    work = canonical_model(model)
    graph = work.graph
    index = GraphIndex(graph)
    names = NameAllocator(graph)

    sites: list[_FoldSite] = []
    kept: list[KeptBatchNorm] = []
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in DEFAULT_DOMAINS:
            continue
        conv, reason = _foldable_conv(node, index)
        if conv is None:
            kept.append(KeptBatchNorm(node.name, reason))
        else:
            sites.append(_FoldSite(node, conv))

    stale: set[str] = set()
    for site in sites:
        stale.update(_fold_one(site, index, names, graph))

    doomed = {id(site.bn) for site in sites}
    remaining = [n for n in graph.node if id(n) not in doomed]
    del graph.node[:]
    graph.node.extend(remaining)
    remove_unused_initializers(graph, stale)
    _drop_value_info(graph, {site.bn.input[0] for site in sites})
    onnx.checker.check_model(work)
    folded = tuple(FoldedBatchNorm(site.bn.name, site.conv.name) for site in sites)
    return BatchNormFolding(model=work, folded=folded, kept=tuple(kept))


def _foldable_conv(bn: onnx.NodeProto, index: GraphIndex) -> tuple[onnx.NodeProto | None, str]:
    """The convolution ``bn`` folds into, or None and the reason it cannot."""
    if int_attr(bn, "training_mode", 0) != 0:
        return None, "runs in training mode"
    if any(out for out in bn.output[1:]):
        return None, "exposes its running mean/variance outputs"
    if int_attr(bn, "spatial", 1) != 1:
        return None, "is a non-spatial (per-element) BatchNormalization"
    params = list(bn.input[1:5])
    if len(params) != 4 or not all(index.is_weight(p) for p in params):
        return None, "its scale, bias, mean or variance is not a constant"
    if not all(index.weight_type(p) in FLOAT_TYPES for p in params):
        return None, "its parameters are not floating point"
    conv = index.producer(bn.input[0])
    if conv is None or conv.op_type not in _CONV_OPS or conv.domain not in DEFAULT_DOMAINS:
        return None, "its input does not come from a Conv or ConvTranspose"
    if index.sole_reader(conv.output[0]) is None:  # a graph output or read elsewhere (a body included)
        return None, f"the output of {conv.name!r} has other readers, which need the unnormalized values"
    if len(conv.input) < 2 or not index.is_weight(conv.input[1]):
        return None, f"the weight of {conv.name!r} is not a constant"
    if index.weight_type(conv.input[1]) not in FLOAT_TYPES:
        return None, f"the weight of {conv.name!r} is not floating point"
    if len(conv.input) > 2 and conv.input[2] and not index.is_weight(conv.input[2]):
        return None, f"the bias of {conv.name!r} is not a constant"
    channels = _output_channels(conv, index.weight_value(conv.input[1]))
    if any(index.weight_value(p).size != channels for p in params):
        return None, f"its parameters do not have one value per output channel of {conv.name!r}"
    return conv, ""


def _output_channels(conv: onnx.NodeProto, weight: np.ndarray) -> int:
    if conv.op_type == "Conv":
        return int(weight.shape[0])
    group = int_attr(conv, "group", 1)
    return int(weight.shape[1]) * group  # ConvTranspose weight is [C_in, C_out / group, k...]


def _fold_one(site: _FoldSite, index: GraphIndex, names: NameAllocator, graph: onnx.GraphProto) -> set[str]:
    """Rewrite the convolution in place; return the initializers that may have become unused."""
    bn, conv = site.bn, site.conv
    gamma, beta, mean, var = (index.weight_value(p).astype(np.float64).ravel() for p in bn.input[1:5])
    eps = float_attr(bn, "epsilon", 1e-5)
    scale = gamma / np.sqrt(var + eps)

    weight_tensor = index.weight_value(conv.input[1])
    weight = weight_tensor.astype(np.float64)
    has_bias = len(conv.input) > 2 and bool(conv.input[2])
    bias = index.weight_value(conv.input[2]).astype(np.float64).ravel() if has_bias else np.zeros_like(scale)

    if conv.op_type == "Conv":
        folded_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    else:
        group = int_attr(conv, "group", 1)
        c_in, c_out_per_group = weight.shape[0], weight.shape[1]
        grouped = weight.reshape((group, c_in // group, c_out_per_group, *weight.shape[2:]))
        per_channel = scale.reshape((group, 1, c_out_per_group) + (1,) * (weight.ndim - 2))
        folded_weight = (grouped * per_channel).reshape(weight.shape)
    folded_bias = (bias - mean) * scale + beta

    dtype = weight_tensor.dtype
    weight_name = names.fresh(f"{conv.name}.folded_weight")
    bias_name = names.fresh(f"{conv.name}.folded_bias")
    graph.initializer.append(numpy_helper.from_array(folded_weight.astype(dtype), weight_name))
    graph.initializer.append(numpy_helper.from_array(folded_bias.astype(dtype), bias_name))

    stale = {conv.input[1], *bn.input[1:5]}
    if has_bias:
        stale.add(conv.input[2])
    conv.input[1] = weight_name
    if len(conv.input) > 2:
        conv.input[2] = bias_name
    else:
        conv.input.append(bias_name)
    conv.output[0] = bn.output[0]
    return stale


def _drop_value_info(graph: onnx.GraphProto, names: set[str]) -> None:
    info = [v for v in graph.value_info if v.name not in names]
    del graph.value_info[:]
    graph.value_info.extend(info)
