"""Static facts about activation ranges (private): which tensors are >= 0 whatever the input, Clip bounds.

Used by the ONNX Runtime placement to pick zero points before any calibration: a tensor known to be
non-negative gets a uint8 grid from zero (twice the resolution), and a Relu/Clip in front of its
QuantizeLinear can be dropped by ORT. Everything here is decided from op types and constants only.
"""

from __future__ import annotations

import numpy as np
import onnx

from service.onnx_graph.graph import GraphIndex
from service.quantize.rewrite import DEFAULT_DOMAINS

# Ops whose output values are input values, moved, repeated, selected or (Resize) interpolated
# between neighbours: the output range is inside the input range.
VALUE_MOVING_OPS = frozenset(
    {
        "MaxPool", "Resize", "Flatten", "Reshape", "Slice", "Squeeze", "Unsqueeze", "Transpose",
        "Expand", "Tile", "Gather", "GatherElements", "ReduceMax", "ReduceMin",
    }
)  # fmt: skip
_NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "Softmax", "HardSigmoid", "Abs", "Exp", "Sqrt"})
_SIGN_PRESERVING_OPS = VALUE_MOVING_OPS | {"AveragePool", "GlobalAveragePool", "Concat", "Add", "Mul"}


def clip_bounds(node: onnx.NodeProto, index: GraphIndex) -> tuple[float | None, float | None]:
    """Constant (min, max) of a Clip at opset >= 11 (bounds as inputs); None where absent or not constant."""
    bounds: list[float | None] = []
    for slot in (1, 2):
        name = node.input[slot] if len(node.input) > slot else ""
        bounds.append(
            float(index.weight_value(name).reshape(-1)[0]) if name and index.is_weight(name) else None
        )
    return bounds[0], bounds[1]


def upper_bound(tensor: str, index: GraphIndex) -> float | None:
    """The constant max of the Clip that writes ``tensor``; None for any other producer."""
    producer = index.producer(tensor)
    if producer is None or producer.op_type != "Clip" or producer.domain not in DEFAULT_DOMAINS:
        return None
    return clip_bounds(producer, index)[1]


class SignAnalysis:
    """Which tensors are >= 0 whatever the input: outputs of Relu-like ops and what only moves them."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.memo: dict[str, bool] = {}

    def non_negative(self, tensor: str) -> bool:
        # Iterative post-order walk: deep networks would overflow Python's recursion limit.
        stack = [tensor]
        while stack:
            current = stack[-1]
            if current in self.memo:
                stack.pop()
                continue
            pending = [name for name in self._depends_on(current) if name not in self.memo]
            if pending:
                stack.extend(pending)
                continue
            self.memo[current] = self._decide(current)
            stack.pop()
        return self.memo[tensor]

    def _depends_on(self, tensor: str) -> list[str]:
        producer = self.index.producer(tensor)
        if producer is None or producer.op_type not in _SIGN_PRESERVING_OPS:
            return []
        if producer.op_type in VALUE_MOVING_OPS:
            return [producer.input[0]]
        return [name for name in producer.input if name and not self.index.is_weight(name)]

    def _decide(self, tensor: str) -> bool:
        index = self.index
        if index.is_weight(tensor):
            return bool(np.all(index.weight_value(tensor) >= 0))
        producer = index.producer(tensor)
        if producer is None or producer.domain not in DEFAULT_DOMAINS:
            return False
        if producer.op_type in _NON_NEGATIVE_OPS:
            return True
        if producer.op_type == "Clip":
            low = clip_bounds(producer, index)[0]
            return low is not None and low >= 0.0
        if producer.op_type == "Resize" and _string_attr(producer, "mode", "nearest") == "cubic":
            return False  # cubic interpolation overshoots below zero
        if producer.op_type in _SIGN_PRESERVING_OPS:
            inputs = self._depends_on(tensor)
            constants = [n for n in producer.input[1:] if n and index.is_weight(n)]
            if producer.op_type in ("Add", "Mul") and constants:
                return all(self.memo[n] for n in inputs) and all(self._decide(n) for n in constants)
            return bool(inputs) and all(self.memo[n] for n in inputs)
        return False


def _string_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    for attr in node.attribute:
        if attr.name == name:
            return attr.s.decode()
    return default
