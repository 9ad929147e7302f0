"""The ops a fusion chain is made of: weighted anchors, folded scale/BN steps, residual Adds, activations.

:class:`OpRecognizer` decides what a consumer reached by the matcher in :mod:`service.onnx_graph.fusions`
is, including compound activations (SiLU, hard-swish as ``x * gate(x)``) and Clip bounds per opset.
Activation blockers are decided here, where the activation is recognized; the other blocker rules are
in :mod:`service.onnx_graph.fusion_blockers`. The rules and their sources are in the docstring of
:mod:`service.onnx_graph.fusions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import helper

from service.onnx_graph.graph import GraphIndex, node_label

DEFAULT_DOMAINS = ("", "ai.onnx")
ANCHOR_PREFIX = {"Conv": "conv", "ConvTranspose": "deconv", "Gemm": "gemm", "MatMul": "gemm"}
SCALE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
# Activations TensorRT documents fusing into convolutions (see the docstring of onnx_graph/fusions.py).
INT8_FUSABLE_ACTIVATION_OPS = frozenset({"Relu", "Clip"})
GENERIC_ACTIVATION_OPS = frozenset(
    {
        "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
        "Softplus", "Softsign", "ThresholdedRelu", "Gelu", "Mish",
    }
)  # fmt: skip
QUANTIZE_OP = "QuantizeLinear"
DEQUANTIZE_OP = "DequantizeLinear"
FLOAT_LIMIT = 3.4028234663852886e38  # Clip's default bounds before opset 11 (float32 max)


def is_default(node: onnx.NodeProto) -> bool:
    """Whether the node is in the default ONNX domain (other domains' ops are never matched)."""
    return node.domain in DEFAULT_DOMAINS


@dataclass(frozen=True)
class Hop:
    """A consumer reached from a tensor, directly or through one Q->DQ pair (found by the matcher)."""

    node: onnx.NodeProto
    via: str  # the tensor the node reads
    qdq: tuple[onnx.NodeProto, ...]  # the Q and DQ crossed, empty when direct
    shared: tuple[tuple[str, int], ...]  # tensors on the way used more than once, with their use count


@dataclass(frozen=True)
class Activation:
    """A recognized activation: its display label, nodes, and whether it fuses as ReLU does."""

    label: str
    nodes: tuple[onnx.NodeProto, ...]
    relu_like: bool
    blocker: str | None
    uses: int  # how many uses of the input tensor belong to the activation itself (SiLU reads it twice)


class OpRecognizer:
    """Recognizes chain parts in one graph; ``opset`` decides how Clip takes its bounds."""

    def __init__(self, index: GraphIndex, opset: int) -> None:
        self.index = index
        self.opset = opset

    def is_anchor(self, node: onnx.NodeProto) -> bool:
        """A weighted node (Conv, ConvTranspose, Gemm, MatMul) that starts a chain."""
        return node.op_type in ANCHOR_PREFIX and bool(node.output) and bool(node.output[0])

    def is_bn(self, hop: Hop) -> bool:
        """A BatchNormalization that normalizes the chain's tensor."""
        return (
            is_default(hop.node) and hop.node.op_type == "BatchNormalization" and hop.node.input[0] == hop.via
        )

    def is_scale(self, hop: Hop) -> bool:
        """A constant elementwise affine step (bias add, per-channel scale) TensorRT folds into the kernel."""
        node = hop.node
        if not is_default(node) or node.op_type not in SCALE_OPS or len(node.input) != 2:
            return False
        if node.input[0] == hop.via:
            return self.index.is_constant(node.input[1])
        # c + x and c * x are affine too; c - x and c / x are not worth special-casing.
        return (
            node.op_type in ("Add", "Mul")
            and node.input[1] == hop.via
            and self.index.is_constant(node.input[0])
        )

    def is_residual_add(self, hop: Hop) -> bool:
        """A two-input Add/Sum whose other input is a non-constant tensor (a residual connection)."""
        node = hop.node
        if not is_default(node) or node.op_type not in ("Add", "Sum") or len(node.input) != 2:
            return False
        other = node.input[1] if node.input[0] == hop.via else node.input[0]
        return bool(other) and other != hop.via and not self.index.is_constant(other)

    def activation(self, hop: Hop) -> Activation | None:
        """The activation applied to the chain's tensor at this hop, or None when it is not one."""
        node = hop.node
        if node.op_type not in INT8_FUSABLE_ACTIVATION_OPS | GENERIC_ACTIVATION_OPS or not is_default(node):
            return None
        if node.input[0] != hop.via:
            return None
        label = node_label(node)
        if node.op_type == "Relu":
            return Activation("Relu", (node,), True, None, 1)
        if node.op_type == "Clip":
            return self._clip(node)
        if node.op_type in ("Sigmoid", "HardSigmoid"):
            gate = self._gating_mul(node, hop.via)
            if gate is not None:
                name = self._gated_name(node)
                return Activation(name, (node, gate), False, _generic_blocker(name, label), 2)
        if node.op_type in GENERIC_ACTIVATION_OPS:
            return Activation(node.op_type, (node,), False, _generic_blocker(node.op_type, label), 1)
        return None

    def _gating_mul(self, gate: onnx.NodeProto, tensor: str) -> onnx.NodeProto | None:
        """The Mul of ``x * gate(x)`` (SiLU, hard-swish), when the gate's output feeds only that Mul."""
        consumers = self.index.consumers(gate.output[0])
        if len(consumers) != 1 or self.index.use_count(gate.output[0]) != 1:
            return None
        mul = consumers[0]
        if mul.op_type == "Mul" and set(mul.input) == {tensor, gate.output[0]}:
            return mul
        return None

    @staticmethod
    def _gated_name(gate: onnx.NodeProto) -> str:
        if gate.op_type == "Sigmoid":
            return "SiLU"
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in gate.attribute}
        # HardSwish(x) = x * HardSigmoid(x) with alpha 1/6 and beta 0.5 (HardSigmoid's defaults are 0.2/0.5).
        if math.isclose(attrs.get("alpha", 0.2), 1 / 6, rel_tol=1e-4) and math.isclose(
            attrs.get("beta", 0.5), 0.5
        ):
            return "HardSwish"
        return "x*HardSigmoid"

    def _clip(self, node: onnx.NodeProto) -> Activation:
        label = node_label(node)
        bounds = self._clip_bounds(node)
        if bounds is None:
            blocker = (
                f"Clip '{label}' takes non-constant bounds: TensorRT fuses only a Clip with constant bounds "
                "into a convolution."
            )
            return Activation("Clip(?)", (node,), False, blocker, 1)
        low, high = bounds
        text = f"Clip({_bound_text(low)},{_bound_text(high)})"
        return Activation(text, (node,), math.isclose(low, 0.0) and math.isclose(high, 6.0), None, 1)

    def _clip_bounds(self, node: onnx.NodeProto) -> tuple[float, float] | None:
        if self.opset and self.opset < 11:
            attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
            return float(attrs.get("min", -FLOAT_LIMIT)), float(attrs.get("max", FLOAT_LIMIT))
        values: list[float] = []
        for position, default in ((1, -math.inf), (2, math.inf)):
            name = node.input[position] if len(node.input) > position else ""
            if not name:
                values.append(default)
                continue
            value = self.index.constant_value(name)
            if value is None or value.size != 1:
                return None
            values.append(float(value.reshape(())))
        return values[0], values[1]


def _generic_blocker(activation: str, label: str) -> str:
    return (
        f"activation {activation} ('{label}') is not one TensorRT documents fusing into convolutions (ReLU, "
        "Clip): expect it to run as a separate layer after an INT8 convolution (FP32/FP16 builds may still "
        "fuse it by pointwise fusion)."
    )


def _bound_text(value: float) -> str:
    if value >= FLOAT_LIMIT or (math.isinf(value) and value > 0):
        return "inf"
    if value <= -FLOAT_LIMIT or math.isinf(value):
        return "-inf"
    return f"{value:g}"
