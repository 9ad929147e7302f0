"""The results of static fusion analysis: one :class:`FusionPattern` per chain, their summary by kind.

Plain frozen dataclasses with their JSON form, kept apart from the matcher in
:mod:`service.onnx_graph.fusions` so reports and stored build records can use them without the
matching machinery.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any


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
