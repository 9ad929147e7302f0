"""Static fusion analysis: which layer fusions TensorRT can make in an ONNX graph, and what blocks them.

``analyze_fusions(model)`` finds, once per weighted node (Conv, ConvTranspose, Gemm, MatMul), the chain
TensorRT folds into that node's kernel and reports it as a :class:`FusionPattern`:

    anchor [-> constant scale/bias ops] [-> BatchNormalization [-> constant scale ops]]
           [-> residual Add/Sum(2 inputs)] [-> activation]

The kind names the parts: ``conv_bn_relu``, ``conv_bn_add`` (activation after the Add recorded, not in
the kind), ``conv_relu``, ``conv_bn``, ``conv_add``, ``conv_act`` (any other activation), and the same
with ``deconv_`` (ConvTranspose) and ``gemm_`` (Gemm, MatMul with an optional constant bias Add).
``Clip(0,6)`` is ReLU6 and counts as ``relu``; other Clip bounds give ``*_act``. A chain without BN,
Add or activation is no pattern. Every node belongs to at most one pattern: an Add fed by two
Conv->BN chains (a downsampling ResNet block) belongs to the chain on the longer path from the inputs
(the branch computed last, which is where TensorRT fuses it, as TensorRT-RTX's light_resnet50 plans
show); the other chain is a ``conv_bn``.

Q/DQ graphs are matched *through* the QuantizeLinear/DequantizeLinear pairs TensorRT fuses: DQ on the
weights and Q->DQ on the anchor's input are the expected placement and do not break a chain; a Q->DQ
pair *inside* a chain (between Conv and BN, BN and activation, the chain and its Add) is a blocker.
``Identity`` and inference ``Dropout`` nodes are looked through (every backend removes them; PaddlePaddle
exports put an Identity after each op) and are not part of any pattern.

Blockers (``int8_fusable`` is true when there are none; for FP32 graphs it means "fuses once quantized
with correct placement", so the Q/DQ rules only apply to graphs that contain Q/DQ):
- an intermediate tensor used more than once (several consumers, or also a graph output);
- BatchNormalization with non-constant parameters, in training mode, or with spatial=0;
- an activation TensorRT does not fuse into INT8 convolutions, or a Clip with non-constant bounds;
- Q/DQ only: a Q/DQ pair inside the chain; a residual Add input that is not DequantizeLinear output;
  an anchor input or weight that is not DequantizeLinear output; a bias through DequantizeLinear.

Sources relied on: TensorRT Developer Guide, "Layer Fusion Catalog" (docs.nvidia.com/deeplearning/
tensorrt/latest/performance/fusion-catalog.html: Convolution and ReLU Activation, Convolution and Clip
Activation, Convolution and ElementWise sum, Convolution and Scale) and "Explicit Quantization: Q/DQ
Layer-Placement Recommendations" (quantize all inputs of weighted operations; do not quantize their
outputs; BatchNormalization and ReLU are fused with the convolution without simulating the fusion in
training; quantize the residual input of an elementwise add so the add fuses into the INT8
convolution). Only ReLU and Clip are treated as INT8-fusable activations because they are the ones
documented. Measured with TensorRT-RTX 1.7 on this project's graphs: FP32 plans also fold LeakyRelu,
HardSwish, HardSigmoid, Sigmoid and Tanh into the convolution layer (Selu and Softplus stay separate),
while INT8 plans run every activation, ReLU included, in a pointwise layer after the convolution.

Linear in the size of the graph: one index build, then a bounded walk from each weighted node.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import onnx
from onnx import helper

from service.onnx_graph.graph import GraphIndex, node_label

DEFAULT_DOMAINS = ("", "ai.onnx")
ANCHOR_PREFIX = {"Conv": "conv", "ConvTranspose": "deconv", "Gemm": "gemm", "MatMul": "gemm"}
SCALE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
# Activations TensorRT documents fusing into convolutions (see the module docstring).
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
MAX_PASS_THROUGH = 4  # Q/DQ pairs followed in a row before giving up (a guard against odd graphs)


@dataclass(frozen=True)
class FusionPattern:
    """One chain TensorRT can fold into a single kernel, and what stands in its way."""

    kind: str
    nodes: tuple[str, ...]  # node labels in execution order; the first is the weighted node
    op_types: tuple[str, ...]
    activation: str | None  # "Relu", "Clip(0,6)", "LeakyRelu", "SiLU", ... or None
    int8_fusable: bool
    blockers: tuple[str, ...] = ()
    residual_input: str | None = None  # the Add input coming from outside the chain

    @property
    def anchor(self) -> str:
        return self.nodes[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "nodes": list(self.nodes),
            "op_types": list(self.op_types),
            "activation": self.activation,
            "int8_fusable": self.int8_fusable,
            "blockers": list(self.blockers),
            "residual_input": self.residual_input,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionPattern:
        return cls(
            kind=data["kind"],
            nodes=tuple(data["nodes"]),
            op_types=tuple(data["op_types"]),
            activation=data["activation"],
            int8_fusable=data["int8_fusable"],
            blockers=tuple(data["blockers"]),
            residual_input=data.get("residual_input"),
        )


@dataclass(frozen=True)
class KindCount:
    """How many patterns of one kind were found and how many of them are blocked."""

    kind: str
    count: int
    blocked: int


@dataclass(frozen=True)
class FusionSummary:
    total: int
    blocked: int
    kinds: tuple[KindCount, ...]  # sorted by kind

    def count(self, kind: str) -> int:
        return next((entry.count for entry in self.kinds if entry.kind == kind), 0)

    def blocked_count(self, kind: str) -> int:
        return next((entry.blocked for entry in self.kinds if entry.kind == kind), 0)


@dataclass(frozen=True)
class FusionAnalysis:
    """All patterns of a graph, in topological order of their weighted node."""

    patterns: tuple[FusionPattern, ...]
    explicit_quantization: bool

    @cached_property
    def summary(self) -> FusionSummary:
        counts = Counter(pattern.kind for pattern in self.patterns)
        blocked = Counter(pattern.kind for pattern in self.patterns if not pattern.int8_fusable)
        kinds = tuple(KindCount(kind, counts[kind], blocked[kind]) for kind in sorted(counts))
        return FusionSummary(total=len(self.patterns), blocked=sum(blocked.values()), kinds=kinds)

    def of_kind(self, kind: str) -> tuple[FusionPattern, ...]:
        return tuple(pattern for pattern in self.patterns if pattern.kind == kind)

    def to_dict(self) -> dict[str, Any]:
        summary = self.summary
        return {
            "patterns": [pattern.to_dict() for pattern in self.patterns],
            "summary": {
                "explicit_quantization": self.explicit_quantization,
                "total": summary.total,
                "blocked": summary.blocked,
                "by_kind": {e.kind: {"count": e.count, "blocked": e.blocked} for e in summary.kinds},
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionAnalysis:
        return cls(
            patterns=tuple(FusionPattern.from_dict(item) for item in data["patterns"]),
            explicit_quantization=bool(data["summary"]["explicit_quantization"]),
        )


def analyze_fusions(model: onnx.ModelProto) -> FusionAnalysis:
    """Find the fusion patterns of a validated model (see the module docstring for the rules)."""
    index = GraphIndex.from_model(model)
    opset = next((int(entry.version) for entry in model.opset_import if entry.domain in DEFAULT_DOMAINS), 0)
    explicit = any(node.op_type in (QUANTIZE_OP, DEQUANTIZE_OP) for node in index.nodes if _default(node))
    return FusionAnalysis(
        patterns=_Matcher(index, opset, explicit).patterns(), explicit_quantization=explicit
    )


def _default(node: onnx.NodeProto) -> bool:
    return node.domain in DEFAULT_DOMAINS


@dataclass(frozen=True)
class _Hop:
    """A consumer reached from a tensor, directly or through one Q->DQ pair."""

    node: onnx.NodeProto
    via: str  # the tensor the node reads
    qdq: tuple[onnx.NodeProto, ...]  # the Q and DQ crossed, empty when direct
    shared: tuple[tuple[str, int], ...]  # tensors on the way used more than once, with their use count


@dataclass
class _Chain:
    """A chain being matched (internal, mutable while matching)."""

    nodes: list[onnx.NodeProto]
    tensor: str  # output of the last node
    blockers: list[str]
    has_bn: bool = False
    add: onnx.NodeProto | None = None
    residual: str | None = None
    activation: str | None = None
    relu_like: bool = False


@dataclass(frozen=True)
class _Activation:
    label: str
    nodes: tuple[onnx.NodeProto, ...]
    relu_like: bool
    blocker: str | None
    uses: int  # how many uses of the input tensor belong to the activation itself (SiLU reads it twice)


class _Matcher:
    def __init__(self, index: GraphIndex, opset: int, explicit: bool) -> None:
        self.index = index
        self.opset = opset
        self.explicit = explicit

    def patterns(self) -> tuple[FusionPattern, ...]:
        anchors = [
            node for node in self.index.topological_order() if _default(node) and self._is_anchor(node)
        ]
        heads = {node_label(anchor): self._head(anchor) for anchor in anchors}
        claims = self._claim_adds(heads)
        found: list[FusionPattern] = []
        for anchor in anchors:
            chain = heads[node_label(anchor)]
            claim = claims.get(node_label(anchor))
            if claim is not None:
                self._take_add(chain, claim)
            self._take_activation(chain)
            pattern = self._pattern(anchor, chain)
            if pattern is not None:
                found.append(pattern)
        return tuple(found)

    # -- walking ------------------------------------------------------------------------------

    def _hops(
        self, tensor: str, shared: tuple[tuple[str, int], ...] = (), qdq: tuple[onnx.NodeProto, ...] = ()
    ) -> Iterator[_Hop]:
        """The consumers of ``tensor``, looking through Identity/inference Dropout and Q->DQ pairs."""
        uses = self.index.use_count(tensor)
        if uses > 1:
            shared = (*shared, (tensor, uses))
        for consumer in self.index.consumers(tensor):
            if not _default(consumer) or len(qdq) > 2 * MAX_PASS_THROUGH:
                yield _Hop(consumer, tensor, qdq, shared)
            elif self._is_pass_through(consumer):
                yield from self._hops(consumer.output[0], shared, qdq)
            elif self.explicit and consumer.op_type == QUANTIZE_OP:
                for dq in self.index.consumers(consumer.output[0]):
                    if dq.op_type == DEQUANTIZE_OP:
                        q_uses = self.index.use_count(consumer.output[0])
                        through = (*shared, (consumer.output[0], q_uses)) if q_uses > 1 else shared
                        yield from self._hops(dq.output[0], through, (*qdq, consumer, dq))
            else:
                yield _Hop(consumer, tensor, qdq, shared)

    def _is_pass_through(self, node: onnx.NodeProto) -> bool:
        """Identity, and Dropout whose mask nobody reads: no-ops every backend removes."""
        if node.op_type == "Identity":
            return True
        if node.op_type != "Dropout":
            return False
        return all(self.index.use_count(name) == 0 for name in node.output[1:] if name)

    def _step(self, chain: _Chain, hop: _Hop, own_uses: int = 1) -> None:
        """Append the hop's node to the chain, recording what keeps it from fusing."""
        node = hop.node
        previous = chain.nodes[-1]
        for tensor, uses in hop.shared:
            if uses > own_uses or tensor != hop.via:
                chain.blockers.append(self._shared_blocker(tensor, uses, previous, node, chain.nodes[0]))
        if hop.qdq:
            chain.blockers.append(self._qdq_blocker(hop.qdq, previous, node, chain.nodes[0]))
        chain.nodes.append(node)
        chain.tensor = node.output[0]

    def _head(self, anchor: onnx.NodeProto) -> _Chain:
        """The anchor with its constant scale/bias ops and BatchNormalization: up to a residual Add."""
        chain = _Chain(nodes=[anchor], tensor=anchor.output[0], blockers=self._anchor_blockers(anchor))
        while True:
            # Scale ops are absorbed only from a tensor nothing else reads: a constant Add on a shared tensor
            # is usually the start of something else (the "+3" of a decomposed hard-swish).
            hop = next((h for h in self._hops(chain.tensor) if self._is_scale(h) and not h.shared), None)
            if hop is None and not chain.has_bn:
                hop = next((h for h in self._hops(chain.tensor) if self._is_bn(h)), None)
                if hop is not None:
                    self._step(chain, hop)
                    chain.has_bn = True
                    chain.blockers.extend(self._bn_blockers(hop.node))
                    continue
            if hop is None:
                return chain
            self._step(chain, hop)

    def _claim_adds(self, heads: dict[str, _Chain]) -> dict[str, _Hop]:
        """Give each residual Add to one chain: unshared over shared, direct over Q/DQ, deeper first."""
        candidates: dict[str, list[tuple[tuple[int, int, int, int], str, _Hop]]] = {}
        for label, chain in heads.items():
            depth = self.index.depths[node_label(chain.nodes[-1])]
            for hop in self._hops(chain.tensor):
                if not self._is_residual_add(hop):
                    continue
                position = list(hop.node.input).index(hop.via)
                rank = (1 if hop.shared else 0, 1 if hop.qdq else 0, -depth, position)
                candidates.setdefault(node_label(hop.node), []).append((rank, label, hop))
        claims: dict[str, _Hop] = {}
        for options in candidates.values():
            for _rank, label, hop in sorted(options, key=lambda option: option[0]):
                if label not in claims:
                    claims[label] = hop
                    break
        return claims

    def _take_add(self, chain: _Chain, hop: _Hop) -> None:
        self._step(chain, hop)
        chain.add = hop.node
        residual = next(name for name in hop.node.input if name != hop.via)
        chain.residual = residual
        if self.explicit:
            producer = self.index.producer(residual)
            if producer is None or producer.op_type != DEQUANTIZE_OP:
                chain.blockers.append(
                    f"the residual input '{residual}' of {hop.node.op_type} '{node_label(hop.node)}' "
                    "carries no Q/DQ: TensorRT then cannot fuse the Add into the INT8 convolution. Quantize "
                    "it (QuantizeLinear -> DequantizeLinear right before the Add)."
                )

    def _take_activation(self, chain: _Chain) -> None:
        for hop in self._hops(chain.tensor):
            activation = self._activation(hop)
            if activation is None:
                continue
            self._step(chain, hop, own_uses=activation.uses)
            for extra in activation.nodes[1:]:
                chain.nodes.append(extra)
                chain.tensor = extra.output[0]
            chain.activation = activation.label
            chain.relu_like = activation.relu_like
            if activation.blocker:
                chain.blockers.append(activation.blocker)
            return

    def _pattern(self, anchor: onnx.NodeProto, chain: _Chain) -> FusionPattern | None:
        parts = [ANCHOR_PREFIX[anchor.op_type]]
        if chain.has_bn:
            parts.append("bn")
        if chain.add is not None:
            parts.append("add")
        elif chain.activation is not None:
            parts.append("relu" if chain.relu_like else "act")
        if len(parts) == 1:
            return None
        blockers = tuple(dict.fromkeys(chain.blockers))
        return FusionPattern(
            kind="_".join(parts),
            nodes=tuple(node_label(node) for node in chain.nodes),
            op_types=tuple(node.op_type for node in chain.nodes),
            activation=chain.activation,
            int8_fusable=not blockers,
            blockers=blockers,
            residual_input=chain.residual,
        )

    # -- recognizing ops ------------------------------------------------------------------------

    def _is_anchor(self, node: onnx.NodeProto) -> bool:
        return node.op_type in ANCHOR_PREFIX and bool(node.output) and bool(node.output[0])

    def _is_bn(self, hop: _Hop) -> bool:
        return (
            _default(hop.node) and hop.node.op_type == "BatchNormalization" and hop.node.input[0] == hop.via
        )

    def _is_scale(self, hop: _Hop) -> bool:
        """A constant elementwise affine step (bias add, per-channel scale) TensorRT folds into the kernel."""
        node = hop.node
        if not _default(node) or node.op_type not in SCALE_OPS or len(node.input) != 2:
            return False
        if node.input[0] == hop.via:
            return self.index.is_constant(node.input[1])
        # c + x and c * x are affine too; c - x and c / x are not worth special-casing.
        return (
            node.op_type in ("Add", "Mul")
            and node.input[1] == hop.via
            and self.index.is_constant(node.input[0])
        )

    def _is_residual_add(self, hop: _Hop) -> bool:
        node = hop.node
        if not _default(node) or node.op_type not in ("Add", "Sum") or len(node.input) != 2:
            return False
        other = node.input[1] if node.input[0] == hop.via else node.input[0]
        return bool(other) and other != hop.via and not self.index.is_constant(other)

    def _activation(self, hop: _Hop) -> _Activation | None:
        node = hop.node
        if node.op_type not in INT8_FUSABLE_ACTIVATION_OPS | GENERIC_ACTIVATION_OPS or not _default(node):
            return None
        if node.input[0] != hop.via:
            return None
        label = node_label(node)
        if node.op_type == "Relu":
            return _Activation("Relu", (node,), True, None, 1)
        if node.op_type == "Clip":
            return self._clip(node)
        if node.op_type in ("Sigmoid", "HardSigmoid"):
            gate = self._gating_mul(node, hop.via)
            if gate is not None:
                name = self._gated_name(node)
                return _Activation(name, (node, gate), False, _generic_blocker(name, label), 2)
        if node.op_type in GENERIC_ACTIVATION_OPS:
            return _Activation(node.op_type, (node,), False, _generic_blocker(node.op_type, label), 1)
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

    def _clip(self, node: onnx.NodeProto) -> _Activation:
        label = node_label(node)
        bounds = self._clip_bounds(node)
        if bounds is None:
            blocker = (
                f"Clip '{label}' takes non-constant bounds: TensorRT fuses only a Clip with constant bounds "
                "into a convolution."
            )
            return _Activation("Clip(?)", (node,), False, blocker, 1)
        low, high = bounds
        text = f"Clip({_bound_text(low)},{_bound_text(high)})"
        return _Activation(text, (node,), math.isclose(low, 0.0) and math.isclose(high, 6.0), None, 1)

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

    # -- blockers -------------------------------------------------------------------------------

    def _anchor_blockers(self, anchor: onnx.NodeProto) -> list[str]:
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

    def _bn_blockers(self, bn: onnx.NodeProto) -> list[str]:
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

    def _shared_blocker(
        self, tensor: str, uses: int, previous: onnx.NodeProto, node: onnx.NodeProto, anchor: onnx.NodeProto
    ) -> str:
        readers = [node_label(consumer) for consumer in self.index.consumers(tensor)]
        if tensor in self.index.graph_outputs:
            readers.append("graph output")
        return (
            f"tensor '{tensor}' (output of {previous.op_type} '{node_label(previous)}') has {uses} consumers "
            f"({', '.join(readers)}): TensorRT must write it to memory, so {node.op_type} "
            f"'{node_label(node)}' cannot be fused into {anchor.op_type} '{node_label(anchor)}'."
        )

    def _qdq_blocker(
        self,
        qdq: tuple[onnx.NodeProto, ...],
        previous: onnx.NodeProto,
        node: onnx.NodeProto,
        anchor: onnx.NodeProto,
    ) -> str:
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
