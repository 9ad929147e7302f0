"""Which weighted layers a user keeps out of INT8.

Contract: :meth:`SkipSpec.parse` turns the strings of a build request into a spec; each item is

- ``first`` / ``last``: the first / last weighted layer (Conv, ConvTranspose, Gemm or MatMul with a
  constant weight) in topological order; the stem and the classifier are the usual suspects;
- ``op:<OpType>`` or a bare registered ONNX op type such as ``Gemm``: every node of that type;
- ``node:<name>`` or any other bare string: the node with that name.

A bare string that is both a registered op type and a node name of the model means both. The spec
is model-independent; :meth:`SkipSpec.resolve` checks it against one model and returns the node names
to keep out of INT8. An unknown node name is a :class:`~service.errors.BadInput` listing the closest
node names, so a typo never silently quantizes the layer the user meant to protect. Node names are
those of the canonical model (unnamed nodes are named ``<op_type>_<first output>``, see ``canonical.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx.defs

from service.errors import BadInput
from service.onnx_graph.graph import GraphIndex
from service.quantize.canonical import canonical_model
from service.quantize.rewrite import weighted_layers

_FIRST, _LAST = "first", "last"
_OP_PREFIX, _NODE_PREFIX = "op:", "node:"


@dataclass(frozen=True)
class SkipSpec:
    """Layers to keep out of INT8, as requested (not yet checked against a model)."""

    node_names: frozenset[str] = frozenset()
    op_types: frozenset[str] = frozenset()
    first: bool = False
    last: bool = False

    @classmethod
    def parse(cls, items: Sequence[str]) -> SkipSpec:
        """Parse request strings (see the module docstring); blank items are a BadInput."""
        if isinstance(items, str):
            raise BadInput("skip must be a list of strings, not one string; wrap it in a list")
        nodes: set[str] = set()
        ops: set[str] = set()
        first = last = False
        for raw in items:
            item = raw.strip() if isinstance(raw, str) else raw
            if not isinstance(item, str) or not item:
                raise BadInput(f"skip items must be non-empty strings; got {raw!r}")
            if item == _FIRST:
                first = True
            elif item == _LAST:
                last = True
            elif item.startswith(_OP_PREFIX):
                op = item[len(_OP_PREFIX) :]
                if not onnx.defs.has(op):
                    close = difflib.get_close_matches(op, _registered_op_types(), n=3)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise BadInput(f"skip item {item!r} names no ONNX operator type.{hint}")
                ops.add(op)
            elif item.startswith(_NODE_PREFIX):
                nodes.add(item[len(_NODE_PREFIX) :])
            elif onnx.defs.has(item):
                ops.add(item)
            else:
                nodes.add(item)
        return cls(frozenset(nodes), frozenset(ops), first, last)

    @property
    def empty(self) -> bool:
        return not (self.node_names or self.op_types or self.first or self.last)

    def resolve(self, model: onnx.ModelProto) -> frozenset[str]:
        """Names of the model's nodes this spec keeps out of INT8; unknown node names are a BadInput."""
        canonical = canonical_model(model)
        return self.resolve_canonical(canonical)

    def resolve_canonical(self, model: onnx.ModelProto) -> frozenset[str]:
        """:meth:`resolve` for a model that already went through ``canonical_model``."""
        graph = model.graph
        by_name = {n.name: n for n in graph.node}
        unknown = sorted(n for n in self.node_names if n not in by_name and n not in self.op_types)
        if unknown:
            raise BadInput(_unknown_nodes_message(unknown, by_name), details={"unknown_nodes": unknown})

        kept = {n for n in self.node_names if n in by_name}
        kept.update(n.name for n in graph.node if n.op_type in self.op_types)
        if self.first or self.last:
            weighted = weighted_layer_names(model)
            if weighted and self.first:
                kept.add(weighted[0])
            if weighted and self.last:
                kept.add(weighted[-1])
        return frozenset(kept)


def weighted_layer_names(model: onnx.ModelProto) -> tuple[str, ...]:
    """Names of the weighted layers (see ``rewrite.WeightedLayer``) of a canonical model, in order."""
    return tuple(layer.node for layer in weighted_layers(GraphIndex(model.graph)))


def _unknown_nodes_message(unknown: list[str], by_name: dict[str, onnx.NodeProto]) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(by_name), n=3, cutoff=0.5)
        hint = f" (closest: {', '.join(repr(c) for c in close)})" if close else ""
        parts.append(f"{name!r}{hint}")
    return (
        f"skip names nodes the model does not have: {'; '.join(parts)}. Use node names from the model, "
        "an op type such as 'Conv', or 'first'/'last'."
    )


def _registered_op_types() -> list[str]:
    return sorted({schema.name for schema in onnx.defs.get_all_schemas()})
