"""The results of static fusion analysis: one :class:`FusionPattern` per chain, their summary by kind.

Plain frozen dataclasses with their JSON form, kept apart from the matcher in
:mod:`service.onnx_graph.fusions` so reports and stored build records can use them without the
matching machinery.

One vocabulary for what becomes of a pattern (:data:`OUTCOMES`), used by the static analysis (what to
expect of an INT8 build, ``expected``), by the engine report (what the build did, ``status`` in
:mod:`service.builds.fusion_report`), by the CLI and by the API, each with its reason:

``fused``
    every node of the pattern runs in one kernel;
``epilogue``
    the weighted node runs in its own kernel and the rest of the chain in pointwise kernel(s) right
    after it (an activation TensorRT does not fuse into INT8 convolutions, such as SiLU or HardSwish,
    runs this way; TensorRT-RTX runs every INT8 convolution this way);
``separate``
    the nodes run in separate layers that are not a pointwise epilogue (engine reports only);
``blocked``
    the graph itself prevents the fusion (a tensor read twice, BatchNormalization that cannot be
    folded, Q/DQ misplaced...): the reason says what to change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

Outcome = Literal["fused", "epilogue", "separate", "blocked"]
OUTCOMES: tuple[Outcome, ...] = ("fused", "epilogue", "separate", "blocked")


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
    # The blocker that is only about the activation (one of ``blockers``): the convolution still runs in
    # INT8 and the activation follows it as a pointwise epilogue.
    activation_blocker: str | None = None

    @property
    def anchor(self) -> str:
        return self.nodes[0]

    @property
    def structural_blockers(self) -> tuple[str, ...]:
        """The blockers that stop the INT8 fusion itself (everything but the activation's)."""
        return tuple(b for b in self.blockers if b != self.activation_blocker)

    @property
    def expected(self) -> Outcome:
        """What an INT8 build should make of the pattern: fused, epilogue (activation apart) or blocked."""
        if self.structural_blockers:
            return "blocked"
        return "epilogue" if self.blockers else "fused"

    @property
    def reason(self) -> str:
        """Why the pattern is not expected to fuse (empty when it is)."""
        return next(iter(self.structural_blockers), self.activation_blocker or "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "nodes": list(self.nodes),
            "op_types": list(self.op_types),
            "activation": self.activation,
            "int8_fusable": self.int8_fusable,
            "blockers": list(self.blockers),
            "residual_input": self.residual_input,
            "activation_blocker": self.activation_blocker,
            "expected": self.expected,
            "reason": self.reason,
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
            activation_blocker=data.get("activation_blocker"),
        )


@dataclass(frozen=True)
class KindCount:
    """How many patterns of one kind were found, and how many are expected fused, epilogue or blocked."""

    kind: str
    count: int
    blocked: int
    fused: int = 0
    epilogue: int = 0


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
        outcomes = Counter((pattern.kind, pattern.expected) for pattern in self.patterns)
        kinds = tuple(
            KindCount(
                kind,
                counts[kind],
                blocked=outcomes[kind, "blocked"],
                fused=outcomes[kind, "fused"],
                epilogue=outcomes[kind, "epilogue"],
            )
            for kind in sorted(counts)
        )
        blocked = sum(entry.blocked for entry in kinds)
        return FusionSummary(total=len(self.patterns), blocked=blocked, kinds=kinds)

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
                "fused": sum(e.fused for e in summary.kinds),
                "epilogue": sum(e.epilogue for e in summary.kinds),
                "by_kind": {
                    e.kind: {
                        "count": e.count,
                        "total": e.count,
                        "fused": e.fused,
                        "epilogue": e.epilogue,
                        "blocked": e.blocked,
                    }
                    for e in summary.kinds
                },
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionAnalysis:
        return cls(
            patterns=tuple(FusionPattern.from_dict(item) for item in data["patterns"]),
            explicit_quantization=bool(data["summary"]["explicit_quantization"]),
        )
