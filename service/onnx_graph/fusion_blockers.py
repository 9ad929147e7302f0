"""Why a fusion chain cannot fuse into one INT8 kernel: the blocker rules and their messages.

:class:`BlockerRules` covers the anchor's quantization, BatchNormalization parameters and mode, tensors
used more than once, Q/DQ pairs inside a chain and unquantized residual inputs; activation blockers are
decided with the activation in :mod:`service.onnx_graph.fusion_ops`. Each message names the nodes and
says how to fix the graph. The rules and their sources are in the docstring of
:mod:`service.onnx_graph.fusions`.
"""

from __future__ import annotations

import onnx
from onnx import helper

from service.onnx_graph.fusion_ops import DEQUANTIZE_OP
from service.onnx_graph.graph import GraphIndex, node_label


class BlockerRules:
    """The blockers of chains in one graph; the Q/DQ rules apply only when ``explicit`` (a Q/DQ graph)."""

    def __init__(self, index: GraphIndex, explicit: bool) -> None:
        self.index = index
        self.explicit = explicit

    def anchor_blockers(self, anchor: onnx.NodeProto) -> list[str]:
        """In a Q/DQ graph: unquantized anchor inputs or weights, and a bias through DequantizeLinear."""
        if not self.explicit:
            return []
        label, op = node_label(anchor), anchor.op_type
        blockers: list[str] = []
        roles = [("input", 0), ("weights" if op != "MatMul" else "second input", 1)]
        for role, position in roles:
            name = anchor.input[position] if len(anchor.input) > position else ""
            producer = self.index.producer(name) if name else None
            if producer is None or producer.op_type != DEQUANTIZE_OP:
                verb = "are" if role == "weights" else "is"
                blockers.append(
                    f"the {role} '{name}' of {op} '{label}' {verb} not quantized (no DequantizeLinear feeds "
                    f"{'them' if role == 'weights' else 'it'}): TensorRT runs this {op} in floating point. "
                    "Quantize all inputs of Conv/ConvTranspose/Gemm/MatMul, weights per channel."
                )
        bias = anchor.input[2] if op in ("Conv", "ConvTranspose") and len(anchor.input) > 2 else ""
        bias_producer = self.index.producer(bias) if bias else None
        if bias_producer is not None and bias_producer.op_type == DEQUANTIZE_OP:
            blockers.append(
                f"the bias '{bias}' of {op} '{label}' goes through DequantizeLinear: TensorRT wants a float "
                "bias (the TensorRT-RTX parser rejects a dequantized int32 bias). Keep the bias in float."
            )
        return blockers

    def bn_blockers(self, bn: onnx.NodeProto) -> list[str]:
        """Non-constant parameters, training mode, or spatial=0."""
        label = node_label(bn)
        blockers: list[str] = []
        names = ("scale", "bias", "mean", "var")
        variable = [
            f"{role} '{name}'"
            for role, name in zip(names, bn.input[1:5], strict=False)
            if name and not self.index.is_constant(name)
        ]
        if variable:
            blockers.append(
                f"BatchNormalization '{label}' takes non-constant {', '.join(variable)}: TensorRT folds only "
                "constant BatchNormalization parameters into the convolution."
            )
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in bn.attribute}
        used_stats = [name for name in bn.output[1:] if name and self.index.use_count(name) > 0]
        if attrs.get("training_mode", 0) or used_stats:
            blockers.append(
                f"BatchNormalization '{label}' runs in training mode (it updates or outputs its statistics): "
                "export the model in eval mode so it becomes a per-channel scale TensorRT can fold."
            )
        if attrs.get("spatial", 1) == 0:
            blockers.append(
                f"BatchNormalization '{label}' has spatial=0 (statistics per activation, not per channel), "
                "which cannot be folded into a convolution."
            )
        return blockers

    def shared_blocker(
        self, tensor: str, uses: int, previous: onnx.NodeProto, node: onnx.NodeProto, anchor: onnx.NodeProto
    ) -> str:
        """A tensor inside the chain that something else also reads (or that is a graph output)."""
        readers = [node_label(consumer) for consumer in self.index.consumers(tensor)]
        if tensor in self.index.graph_outputs:
            readers.append("graph output")
        return (
            f"tensor '{tensor}' (output of {previous.op_type} '{node_label(previous)}') has {uses} consumers "
            f"({', '.join(readers)}): TensorRT must write it to memory, so {node.op_type} "
            f"'{node_label(node)}' cannot be fused into {anchor.op_type} '{node_label(anchor)}'."
        )

    def qdq_blocker(
        self,
        qdq: tuple[onnx.NodeProto, ...],
        previous: onnx.NodeProto,
        node: onnx.NodeProto,
        anchor: onnx.NodeProto,
    ) -> str:
        """A Q->DQ pair between two nodes of the chain."""
        pair = " -> ".join(f"{n.op_type} '{node_label(n)}'" for n in qdq)
        where = f"between {previous.op_type} '{node_label(previous)}' and {node.op_type} '{node_label(node)}'"
        if node.op_type in ("Add", "Sum"):
            advice = (
                f"TensorRT cannot fuse the Add into the INT8 {anchor.op_type}: the {anchor.op_type} branch "
                "must enter the Add unquantized and only the residual input be quantized."
            )
        else:
            advice = (
                f"TensorRT cannot fuse {node.op_type} into the INT8 {anchor.op_type} across it. Quantize the "
                f"inputs of {anchor.op_type}, not its output."
            )
        return f"{pair} sit {where}: {advice}"

    def residual_blocker(self, add: onnx.NodeProto, residual: str) -> str | None:
        """In a Q/DQ graph, the residual input of the chain's Add must come out of DequantizeLinear."""
        if not self.explicit:
            return None
        producer = self.index.producer(residual)
        if producer is not None and producer.op_type == DEQUANTIZE_OP:
            return None
        return (
            f"the residual input '{residual}' of {add.op_type} '{node_label(add)}' "
            "carries no Q/DQ: TensorRT then cannot fuse the Add into the INT8 convolution. Quantize "
            "it (QuantizeLinear -> DequantizeLinear right before the Add)."
        )
