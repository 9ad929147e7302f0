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

Each pattern's ``expected`` outcome uses the vocabulary of :mod:`service.onnx_graph.fusion_results`:
``fused`` without blockers, ``epilogue`` when the activation is the only one (SiLU, HardSwish and the
other activations TensorRT does not document fusing into INT8 convolutions: the convolution still runs
in INT8, the activation in a pointwise layer after it), ``blocked`` otherwise, with the reason.

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

The code is split by concern: this module walks the graph and assembles the chains
(:func:`analyze_fusions`), :mod:`service.onnx_graph.fusion_ops` recognizes each part of a chain,
:mod:`service.onnx_graph.fusion_blockers` holds the blocker rules, and
:mod:`service.onnx_graph.fusion_results` the result dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import onnx

from service.onnx_graph.fusion_blockers import BlockerRules
from service.onnx_graph.fusion_ops import (
    ANCHOR_PREFIX,
    DEFAULT_DOMAINS,
    DEQUANTIZE_OP,
    QUANTIZE_OP,
    Hop,
    OpRecognizer,
    is_default,
)
from service.onnx_graph.fusion_results import FusionAnalysis, FusionPattern
from service.onnx_graph.graph import GraphIndex, node_label

MAX_PASS_THROUGH = 4  # Q/DQ pairs followed in a row before giving up (a guard against odd graphs)


def analyze_fusions(model: onnx.ModelProto) -> FusionAnalysis:
    """Find the fusion patterns of a validated model (see the module docstring for the rules)."""
    index = GraphIndex.from_model(model)
    opset = next((int(entry.version) for entry in model.opset_import if entry.domain in DEFAULT_DOMAINS), 0)
    explicit = any(node.op_type in (QUANTIZE_OP, DEQUANTIZE_OP) for node in index.nodes if is_default(node))
    return FusionAnalysis(
        patterns=_Matcher(index, opset, explicit).patterns(), explicit_quantization=explicit
    )


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
    activation_blocker: str | None = None


class _Matcher:
    def __init__(self, index: GraphIndex, opset: int, explicit: bool) -> None:
        self.index = index
        self.explicit = explicit
        self.ops = OpRecognizer(index, opset)
        self.rules = BlockerRules(index, explicit)

    def patterns(self) -> tuple[FusionPattern, ...]:
        anchors = [
            node for node in self.index.topological_order() if is_default(node) and self.ops.is_anchor(node)
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
    ) -> Iterator[Hop]:
        """The consumers of ``tensor``, looking through Identity/inference Dropout and Q->DQ pairs."""
        uses = self.index.use_count(tensor)
        if uses > 1:
            shared = (*shared, (tensor, uses))
        for consumer in self.index.consumers(tensor):
            if not is_default(consumer) or len(qdq) > 2 * MAX_PASS_THROUGH:
                yield Hop(consumer, tensor, qdq, shared)
            elif self._is_pass_through(consumer):
                yield from self._hops(consumer.output[0], shared, qdq)
            elif self.explicit and consumer.op_type == QUANTIZE_OP:
                for dq in self.index.consumers(consumer.output[0]):
                    if dq.op_type == DEQUANTIZE_OP:
                        q_uses = self.index.use_count(consumer.output[0])
                        through = (*shared, (consumer.output[0], q_uses)) if q_uses > 1 else shared
                        yield from self._hops(dq.output[0], through, (*qdq, consumer, dq))
            else:
                yield Hop(consumer, tensor, qdq, shared)

    def _is_pass_through(self, node: onnx.NodeProto) -> bool:
        """Identity, and Dropout whose mask nobody reads: no-ops every backend removes."""
        if node.op_type == "Identity":
            return True
        if node.op_type != "Dropout":
            return False
        return all(self.index.use_count(name) == 0 for name in node.output[1:] if name)

    def _step(self, chain: _Chain, hop: Hop, own_uses: int = 1) -> None:
        """Append the hop's node to the chain, recording what keeps it from fusing."""
        node = hop.node
        previous = chain.nodes[-1]
        for tensor, uses in hop.shared:
            if uses > own_uses or tensor != hop.via:
                chain.blockers.append(self.rules.shared_blocker(tensor, uses, previous, node, chain.nodes[0]))
        if hop.qdq:
            chain.blockers.append(self.rules.qdq_blocker(hop.qdq, previous, node, chain.nodes[0]))
        chain.nodes.append(node)
        chain.tensor = node.output[0]

    def _head(self, anchor: onnx.NodeProto) -> _Chain:
        """The anchor with its constant scale/bias ops and BatchNormalization: up to a residual Add."""
        chain = _Chain(nodes=[anchor], tensor=anchor.output[0], blockers=self.rules.anchor_blockers(anchor))
        while True:
            # Scale ops are absorbed only from a tensor nothing else reads: a constant Add on a shared tensor
            # is usually the start of something else (the "+3" of a decomposed hard-swish).
            hop = next((h for h in self._hops(chain.tensor) if self.ops.is_scale(h) and not h.shared), None)
            if hop is None and not chain.has_bn:
                hop = next((h for h in self._hops(chain.tensor) if self.ops.is_bn(h)), None)
                if hop is not None:
                    self._step(chain, hop)
                    chain.has_bn = True
                    chain.blockers.extend(self.rules.bn_blockers(hop.node))
                    continue
            if hop is None:
                return chain
            self._step(chain, hop)

    def _claim_adds(self, heads: dict[str, _Chain]) -> dict[str, Hop]:
        """Give each residual Add to one chain: unshared over shared, direct over Q/DQ, deeper first."""
        candidates: dict[str, list[tuple[tuple[int, int, int, int], str, Hop]]] = {}
        for label, chain in heads.items():
            depth = self.index.depths[node_label(chain.nodes[-1])]
            for hop in self._hops(chain.tensor):
                if not self.ops.is_residual_add(hop):
                    continue
                position = list(hop.node.input).index(hop.via)
                rank = (1 if hop.shared else 0, 1 if hop.qdq else 0, -depth, position)
                candidates.setdefault(node_label(hop.node), []).append((rank, label, hop))
        claims: dict[str, Hop] = {}
        for options in candidates.values():
            for _rank, label, hop in sorted(options, key=lambda option: option[0]):
                if label not in claims:
                    claims[label] = hop
                    break
        return claims

    def _take_add(self, chain: _Chain, hop: Hop) -> None:
        self._step(chain, hop)
        chain.add = hop.node
        residual = next(name for name in hop.node.input if name != hop.via)
        chain.residual = residual
        blocker = self.rules.residual_blocker(hop.node, residual)
        if blocker is not None:
            chain.blockers.append(blocker)

    def _take_activation(self, chain: _Chain) -> None:
        for hop in self._hops(chain.tensor):
            activation = self.ops.activation(hop)
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
                chain.activation_blocker = activation.blocker
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
            activation_blocker=chain.activation_blocker,
        )
