"""Fusion verification: which statically expected fusions a built engine really made, in which precision.

``verify_fusions(analysis, layer_report, backend=...)`` checks every :class:`FusionPattern` of the
static analysis against the engine's layers, by layer type and node coverage (never by counting
mentions: TensorRT-RTX names an INT8 Conv in up to three layers' metadata, its input quantizer, its
``correlation`` kernel and its epilogue). Each pattern gets a status:

``fused``
    One weighted compute layer (convolution/GEMM kind: ``runtime_fusion``, ``correlation``,
    ``CaskConvolution``, ``FusedConv``, ``FusedGemm``, nchwc ``Conv``...) holds every node of the
    pattern. Nodes that no layer names are accepted as folded into it when they are BatchNormalization
    or constant scale ops (folded into the weights, possibly before the build) and, on ONNX Runtime
    reports, for any op (ONNX Runtime deletes the nodes it fuses); the verdict then says so
    (``inferred``).
``epilogue``
    The weighted node has its own compute layer and the rest of the pattern runs in separate pointwise
    kernels (``kgen``, ``PointWise``). This is how TensorRT-RTX 1.7 builds every INT8 convolution: the
    ``correlation`` layer reads Int8 and writes a Float tensor, and a ``kgen`` layer reads that tensor
    back to apply bias, BatchNormalization, the residual Add, the activation and the requantization.
    Two kernels with an FP32 round trip through memory between them are not one fused kernel, so this
    is *not* counted as fused; it is reported as ``fused_as`` "correlation + pointwise epilogue (1 kgen
    layer)" and counted separately in the summary. (Nothing in the TensorRT-RTX documentation says the
    two launch as one kernel, and the dump shows the intermediate tensor.)
``separate``
    The nodes ran in layers that are neither of the above (ONNX Runtime's unfused Conv, Sum, Relu).
``blocked``
    Separate layers, and the static analysis had found why: the graph blocks the fusion (a tensor read
    twice, BatchNormalization that cannot be folded, misplaced Q/DQ); the explanation starts with that
    reason.
``unverifiable``
    The nodes sit inside an opaque Myelin/ForeignNode layer whose inner kernels the report does not list.
``missing``
    No layer names any node of the pattern: the report belongs to another model, or the backend renamed
    the nodes beyond recognition.

``fused``, ``epilogue``, ``separate`` and ``blocked`` are the vocabulary the static analysis uses for
its ``expected`` outcome (:mod:`service.onnx_graph.fusion_results`), so the two reports compare directly.

ONNX Runtime reports come from :func:`service.backends.layer_report.layer_report_from_optimized_graph`,
which traces fused nodes back to original names (kept root names, ``_nchwc`` suffixes, outputs); the
fusions ONNX Runtime makes on CPU are Conv+BN folding, ``FusedConv``/``FusedGemm`` with Relu/Clip/
LeakyRelu/Sigmoid/Tanh/HardSigmoid activations, and with ORT_ENABLE_ALL, NCHWc convolutions that also
absorb a residual Sum and the Relu after it. A Q/DQ graph keeps its Conv, BN and Relu apart on ONNX
Runtime unless the Conv output is quantized (QLinearConv), which TensorRT's placement rules forbid.

The summary gives totals and fused counts per kind (``conv_bn_relu_total``/``_fused``...), the share of
INT8 layers among compute layers (every layer that is neither a reformat/cast nor a stream
synchronisation marker or host shape call) and among weighted compute layers, and the number of
reformat/cast layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.backends.base import EngineLayer, LayerReport
from service.backends.capabilities import capabilities_of
from service.onnx_graph.fusion_ops import SCALE_OPS
from service.onnx_graph.fusion_results import FusionAnalysis, FusionPattern

Status = Literal["fused", "epilogue", "separate", "blocked", "unverifiable", "missing"]

# Layer types, matched case-insensitively as substrings of EngineLayer.type.
WEIGHTED_TYPE_WORDS = (
    "conv", "correlation", "gemm", "matmul", "matrixmultiply", "fullyconnected", "runtime_fusion", "deconv",
)  # fmt: skip
EPILOGUE_TYPES = frozenset({"kgen", "pointwise", "pointwisev2"})
# Stream synchronisation markers and host-side shape calls: no tensor arithmetic.
NON_COMPUTE_TYPES = frozenset({"signal", "wait", "barrier", "shape_call"})
OPAQUE_TYPE_WORDS = ("myelin", "foreign")
REFORMAT_TYPES = frozenset({"reformat", "cast", "copy", "noop"})
FOLDABLE_OPS = SCALE_OPS | {"BatchNormalization"}


@dataclass(frozen=True)
class PatternVerification:
    """What the engine made of one static pattern."""

    pattern: FusionPattern
    status: Status
    layers: tuple[str, ...]  # engine layers holding the pattern's nodes, compute layer first
    precision: str | None  # precision of the weighted node's compute layer
    fused_as: str | None
    explanation: str  # why it did not fuse; empty when fused
    inferred: bool = False  # fused, counting nodes no layer names as folded into the layer

    @property
    def fused(self) -> bool:
        return self.status == "fused"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.pattern.kind,
            "nodes": list(self.pattern.nodes),
            "activation": self.pattern.activation,
            "int8_fusable": self.pattern.int8_fusable,
            "blockers": list(self.pattern.blockers),
            "status": self.status,
            "expected": self.pattern.expected,
            "reason": self.pattern.reason,
            "fused": self.fused,
            "fused_as": self.fused_as,
            "layers": list(self.layers),
            "precision": self.precision,
            "inferred": self.inferred,
            "explanation": self.explanation,
        }


@dataclass(frozen=True)
class KindVerification:
    kind: str
    total: int
    fused: int
    epilogue: int
    separate: int = 0
    blocked: int = 0


@dataclass(frozen=True)
class VerificationSummary:
    kinds: tuple[KindVerification, ...]
    compute_layers: int
    int8_compute_layers: int
    weighted_layers: int
    int8_weighted_layers: int
    reformat_layers: int

    def total(self, kind: str) -> int:
        return next((entry.total for entry in self.kinds if entry.kind == kind), 0)

    def fused(self, kind: str) -> int:
        return next((entry.fused for entry in self.kinds if entry.kind == kind), 0)

    @property
    def int8_layer_share(self) -> float | None:
        """INT8 compute layers / compute layers (reformats and sync markers excluded); None without any."""
        return _share(self.int8_compute_layers, self.compute_layers)

    @property
    def int8_weighted_layer_share(self) -> float | None:
        """INT8 convolution/GEMM layers / convolution/GEMM layers; None without any."""
        return _share(self.int8_weighted_layers, self.weighted_layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "conv_bn_relu_total": self.total("conv_bn_relu"),
            "conv_bn_relu_fused": self.fused("conv_bn_relu"),
            "conv_bn_add_total": self.total("conv_bn_add"),
            "conv_bn_add_fused": self.fused("conv_bn_add"),
            "by_kind": {
                e.kind: {
                    "total": e.total,
                    "fused": e.fused,
                    "epilogue": e.epilogue,
                    "separate": e.separate,
                    "blocked": e.blocked,
                }
                for e in self.kinds
            },
            "int8_layer_share": self.int8_layer_share,
            "int8_weighted_layer_share": self.int8_weighted_layer_share,
            "compute_layers": self.compute_layers,
            "weighted_layers": self.weighted_layers,
            "reformat_layers": self.reformat_layers,
        }


@dataclass(frozen=True)
class FusionVerification:
    backend: str
    source: str
    patterns: tuple[PatternVerification, ...]
    summary: VerificationSummary

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "source": self.source,
            "patterns": [entry.to_dict() for entry in self.patterns],
            "summary": self.summary.to_dict(),
        }


def verify_fusions(
    analysis: FusionAnalysis, layer_report: LayerReport, *, backend: str
) -> FusionVerification:
    """Check each static pattern against the engine's layers (see the module docstring)."""
    layers = layer_report.layers
    holders: dict[str, list[int]] = {}
    for position, layer in enumerate(layers):
        for node in dict.fromkeys(layer.onnx_nodes):
            holders.setdefault(node, []).append(position)
    checker = _Checker(layers, holders, layer_report.source, backend)
    results = tuple(checker.verify(pattern) for pattern in analysis.patterns)
    return FusionVerification(
        backend=backend,
        source=layer_report.source,
        patterns=results,
        summary=_summary(results, layers),
    )


def layer_role(layer: EngineLayer) -> Literal["sync", "reformat", "opaque", "weighted", "epilogue", "other"]:
    """How verification treats a layer, from its type (see the module constants)."""
    kind = layer.type.strip().lower()
    if kind in NON_COMPUTE_TYPES:
        return "sync"
    if layer.is_reformat or kind in REFORMAT_TYPES or "reformat" in kind:
        return "reformat"
    if any(word in kind for word in OPAQUE_TYPE_WORDS):
        return "opaque"
    if any(word in kind for word in WEIGHTED_TYPE_WORDS):
        return "weighted"
    if kind in EPILOGUE_TYPES:
        return "epilogue"
    return "other"


class _Checker:
    def __init__(
        self, layers: Sequence[EngineLayer], holders: dict[str, list[int]], source: str, backend: str
    ) -> None:
        self.layers = layers
        self.holders = holders
        self.source = source
        self.backend = backend

    def verify(self, pattern: FusionPattern) -> PatternVerification:
        named = [node for node in pattern.nodes if node in self.holders]
        if not named:
            return self._result(pattern, "missing", (), None, None, self._missing_text(pattern))
        anchor_layers = [
            p for p in self.holders.get(pattern.anchor, []) if layer_role(self.layers[p]) == "weighted"
        ]
        if not anchor_layers:
            return self._without_compute_layer(pattern, named)
        # A weighted node normally has one compute layer; if several name it, take the one covering most.
        compute = max(
            anchor_layers, key=lambda p: sum(node in self.layers[p].onnx_nodes for node in pattern.nodes)
        )
        layer = self.layers[compute]
        inside = {node for node in pattern.nodes if node in layer.onnx_nodes}
        absent = [node for node in pattern.nodes if node not in self.holders]
        elsewhere = [node for node in named if node not in inside]
        if not elsewhere and self._may_be_folded(pattern, absent):
            fused_as = layer.type
            if absent:
                listed = ", ".join(f"{_op(pattern, n)} '{n}'" for n in absent)
                fused_as += f" ({listed} named by no layer: taken as folded into it)"
            return self._result(pattern, "fused", (layer.name,), layer.precision, fused_as, "", bool(absent))
        other_layers = self._layers_of(elsewhere, exclude=compute)
        epilogue = [p for p in other_layers if layer_role(self.layers[p]) == "epilogue"]
        names = (layer.name, *(self.layers[p].name for p in other_layers))
        if epilogue and len(epilogue) == len(other_layers) and self._may_be_folded(pattern, absent):
            kinds = sorted({self.layers[p].type for p in epilogue})
            plural = "s" if len(epilogue) > 1 else ""
            fused_as = f"{layer.type} + pointwise epilogue ({len(epilogue)} {'/'.join(kinds)} layer{plural})"
            text = self._epilogue_text(pattern, layer, [self.layers[p] for p in epilogue])
            return self._result(pattern, "epilogue", names, layer.precision, fused_as, text)
        placed = ", ".join(f"{self.layers[p].type} '{self.layers[p].name}'" for p in (compute, *other_layers))
        text = self._separate_text(pattern, [compute, *other_layers], absent)
        return self._result(pattern, "separate", names, layer.precision, f"separate layers: {placed}", text)

    def _without_compute_layer(self, pattern: FusionPattern, named: list[str]) -> PatternVerification:
        positions = self._layers_of(named, exclude=None)
        names = tuple(self.layers[p].name for p in positions)
        opaque = [p for p in positions if layer_role(self.layers[p]) == "opaque"]
        if opaque:
            layer = self.layers[opaque[0]]
            text = (
                f"The nodes run inside the opaque {layer.type} layer '{layer.name}'; the report does not "
                "list its internal kernels, so whether they fused cannot be verified."
            )
            return self._result(pattern, "unverifiable", names, layer.precision, None, text)
        text = (
            f"No convolution/GEMM layer of the engine names {_op(pattern, pattern.anchor)} "
            f"'{pattern.anchor}'. "
            + self._separate_text(pattern, positions, [n for n in pattern.nodes if n not in self.holders])
        )
        return self._result(pattern, "separate", names, None, "separate layers", text)

    # -- helpers --------------------------------------------------------------------------------

    def _may_be_folded(self, pattern: FusionPattern, absent: list[str]) -> bool:
        if self.source == "optimized_graph":
            return True
        return all(_op(pattern, node) in FOLDABLE_OPS for node in absent)

    def _layers_of(self, nodes: Sequence[str], *, exclude: int | None) -> list[int]:
        found: dict[int, None] = {}
        for node in nodes:
            for position in self.holders.get(node, []):
                if position != exclude and layer_role(self.layers[position]) not in ("sync", "reformat"):
                    found[position] = None
        return sorted(found)

    def _result(
        self,
        pattern: FusionPattern,
        status: Status,
        layers: tuple[str, ...],
        precision: str | None,
        fused_as: str | None,
        text: str,
        inferred: bool = False,
    ) -> PatternVerification:
        if status == "separate" and pattern.expected == "blocked":
            # The static analysis knew why: the same word and reason as the model's fusion report.
            status = "blocked"
            text = f"Blocked: {pattern.reason} {text}"
        elif status != "fused" and pattern.reason:
            text = f"{text} Not expected to fuse in INT8 anyway: {pattern.reason}".strip()
        return PatternVerification(pattern, status, layers, precision, fused_as, text, inferred)

    def _epilogue_text(self, pattern: FusionPattern, layer: EngineLayer, epilogue: list[EngineLayer]) -> str:
        rest = ", ".join(f"{_op(pattern, n)} '{n}'" for n in pattern.nodes[1:])
        kernels = ", ".join(f"'{e.name}'" for e in epilogue)
        text = (
            f"{_op(pattern, pattern.anchor)} '{pattern.anchor}' ran as {layer.type} layer '{layer.name}' "
            f"({layer.precision}); {rest} ran in the pointwise layer(s) {kernels}, so the convolution's "
            "result goes through memory before the epilogue reads it."
        )
        if capabilities_of(self.backend).int8_epilogue_in_separate_layers:
            text += (
                " TensorRT-RTX builds every INT8 convolution this way (correlation kernel plus kgen "
                "epilogue); this reflects the backend, not a placement problem in the model."
            )
        return text

    def _separate_text(self, pattern: FusionPattern, positions: Sequence[int], absent: Sequence[str]) -> str:
        parts = []
        for position in positions:
            layer = self.layers[position]
            mine = [f"{_op(pattern, n)} '{n}'" for n in pattern.nodes if n in layer.onnx_nodes]
            others = [n for n in layer.onnx_nodes if n not in pattern.nodes]
            extra = (
                f" together with {', '.join(others[:3])}"
                if others and layer_role(layer) == "weighted"
                else ""
            )
            parts.append(f"{' and '.join(mine)} in {layer.type} layer '{layer.name}'{extra}")
        text = "The pattern's nodes ran in separate layers: " + "; ".join(parts) + "."
        if absent:
            text += " Named by no layer: " + ", ".join(f"{_op(pattern, n)} '{n}'" for n in absent) + "."
        return text

    @staticmethod
    def _missing_text(pattern: FusionPattern) -> str:
        return (
            f"No engine layer names any of {', '.join(pattern.nodes)}: the layer report does not belong to "
            "this model, or the backend renamed the nodes."
        )


def _op(pattern: FusionPattern, node: str) -> str:
    return pattern.op_types[pattern.nodes.index(node)]


def _share(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


def _summary(results: Sequence[PatternVerification], layers: Sequence[EngineLayer]) -> VerificationSummary:
    kinds: dict[str, list[int]] = {}
    for entry in results:
        counts = kinds.setdefault(entry.pattern.kind, [0, 0, 0, 0, 0])
        counts[0] += 1
        counts[1] += entry.status == "fused"
        counts[2] += entry.status == "epilogue"
        counts[3] += entry.status == "separate"
        counts[4] += entry.status == "blocked"
    roles = [layer_role(layer) for layer in layers]
    compute = [layer for layer, role in zip(layers, roles, strict=True) if role not in ("sync", "reformat")]
    weighted = [layer for layer, role in zip(layers, roles, strict=True) if role == "weighted"]
    return VerificationSummary(
        kinds=tuple(KindVerification(kind, *kinds[kind]) for kind in sorted(kinds)),
        compute_layers=len(compute),
        int8_compute_layers=sum(layer.precision == "int8" for layer in compute),
        weighted_layers=len(weighted),
        int8_weighted_layers=sum(layer.precision == "int8" for layer in weighted),
        reformat_layers=roles.count("reformat"),
    )
