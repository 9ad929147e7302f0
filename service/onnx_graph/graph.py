"""Indexing of one ONNX graph: producers, consumers, constants, weights, order and lookup, computed once.

:class:`GraphIndex` is the one read-only view every graph analysis is written against: fusion
patterns, placement checks, layer-report mapping and the quantizer's placement and rewrite rules.
Building it is linear in the size of the graph, subgraphs included, and every question it answers
afterwards is a dictionary lookup.

Conventions:

- Nodes are identified by :func:`node_label`: the node's name, or ``<op_type>_<first output>`` for an
  unnamed node (the same naming the quantizer gives unnamed nodes, so labels survive quantization).
- A tensor is *constant* (:meth:`GraphIndex.is_constant`) when its value cannot depend on the model's
  inputs: an initializer (including the initializers that IR < 4 models also list as graph inputs,
  which TensorRT treats as weights), the output of a ``Constant`` node, or the output of a
  deterministic node whose inputs are all constant (``ConstantOfShape`` of a constant shape,
  ``Unsqueeze`` of a weight, ``Identity``...). TensorRT and ONNX Runtime fold such subgraphs at build
  time, so for fusion purposes they are weights.
- A tensor is a *weight* (:meth:`GraphIndex.weight`) when it is an initializer whose stored value the
  graph always uses, so it can be read and rewritten (quantized, folded, retyped): an initializer that
  is also listed as a graph input is only a default the caller may override (IR >= 4) and is no weight.
  Every weight is constant; a folded or ``Constant``-node constant is no weight (there is no stored
  tensor to rewrite). The quantizer works on ``canonical_model`` output, which has already stopped
  listing the initializers of IR < 4 models as inputs, so there both views agree on those.
- Names read from inside a subgraph (``If``/``Loop``/``Scan`` bodies, see :mod:`.subgraphs`) count as
  inputs of the node that owns the subgraph: :meth:`GraphIndex.consumers` includes the owner, so a
  tensor read by a loop body is never mistaken for an unused or single-reader one.
  :meth:`GraphIndex.readers` lists only the nodes whose own input slots name the tensor: the ones a
  rewrite of input slots can reach.
- The index keeps a reference to the graph and is computed eagerly, except :attr:`GraphIndex.constants`
  and the orders, which are computed on first use. Mutating the graph invalidates the index: code that
  rewrites a graph indexes it again afterwards (and only mutates slots and initializer contents it
  already looked up, while it still uses the old index).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from functools import cached_property

import numpy as np
import onnx

from service.errors import BadInput, InvalidModel
from service.onnx_graph.subgraphs import outer_references, subgraphs_of
from service.onnx_graph.values import constant_node_value, tensor_value

# Ops whose output changes from run to run even with constant inputs: never constant-folded.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


def node_label(node: onnx.NodeProto) -> str:
    """The name reports use for a node: its name, or ``<op_type>_<first output>`` when it has none."""
    if node.name:
        return node.name
    first_output = next((name for name in node.output if name), "")
    return f"{node.op_type}_{first_output}"


class GraphIndex:
    """Producers, consumers, constants, weights and order of one graph (conventions: module docstring).

    The index keeps a reference to the graph; mutating the graph afterwards invalidates it.
    """

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.nodes: tuple[onnx.NodeProto, ...] = tuple(graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {init.name: init for init in graph.initializer}
        self.graph_outputs: frozenset[str] = frozenset(value.name for value in graph.output)
        declared = {value.name for value in graph.input}
        # Real inputs only: IR < 4 models also list every initializer as a graph input.
        self.graph_inputs: frozenset[str] = frozenset(declared - set(self.initializers))
        # An initializer that is also a graph input is only a default the caller may override.
        self.weights: dict[str, onnx.TensorProto] = {
            name: init for name, init in self.initializers.items() if name not in declared
        }
        self._producer: dict[str, int] = {}
        self._consumers: dict[str, list[int]] = {}
        self._readers: dict[str, list[int]] = {}
        self._reads: dict[str, int] = {}  # input slots naming a tensor, plus one per body reading it
        self._inputs: list[tuple[str, ...]] = []
        self._by_label: dict[str, int] = {}
        for position, node in enumerate(self.nodes):
            names = [name for name in node.input if name]
            for name in dict.fromkeys(names):
                self._readers.setdefault(name, []).append(position)
            for sub in subgraphs_of(node):
                names.extend(sorted(outer_references(sub)))
            for name in names:
                self._reads[name] = self._reads.get(name, 0) + 1
            unique = tuple(dict.fromkeys(names))
            self._inputs.append(unique)
            for name in unique:
                self._consumers.setdefault(name, []).append(position)
            for name in node.output:
                if name:
                    self._producer[name] = position
            self._by_label.setdefault(node_label(node), position)

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> GraphIndex:
        return cls(model.graph)

    # -- lookup ---------------------------------------------------------------------------------

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        """The node that writes ``tensor``; None for graph inputs, initializers and unknown names."""
        position = self._producer.get(tensor)
        return None if position is None else self.nodes[position]

    def consumers(self, tensor: str) -> tuple[onnx.NodeProto, ...]:
        """The nodes that read ``tensor`` (each once, in graph order), subgraph owners included."""
        return tuple(self.nodes[position] for position in self._consumers.get(tensor, ()))

    def readers(self, tensor: str) -> tuple[onnx.NodeProto, ...]:
        """The nodes whose own input slots name ``tensor`` (each once, in graph order); no subgraph owners.

        These are the nodes a rewrite of input slots reaches; ask :meth:`consumers` who needs the value.
        """
        return tuple(self.nodes[position] for position in self._readers.get(tensor, ()))

    def sole_reader(self, tensor: str) -> onnx.NodeProto | None:
        """The node that reads ``tensor`` through exactly one input slot, when nothing else needs it.

        None when ``tensor`` is a graph output, is read twice (even by one node, ``Add(x, x)``), or is
        read from a subgraph body: a rule that may fold, fuse or move the tensor's value into its
        reader (BN folding, a residual chain, an activation absorbed by a quantizer) must not fire then.
        """
        if tensor in self.graph_outputs or self._reads.get(tensor, 0) != 1:
            return None
        readers = self._readers.get(tensor)
        return self.nodes[readers[0]] if readers else None

    def use_count(self, tensor: str) -> int:
        """How many places need ``tensor`` materialized: its consumers, plus one if it is a graph output."""
        return len(self._consumers.get(tensor, ())) + (1 if tensor in self.graph_outputs else 0)

    def inputs_of(self, node: onnx.NodeProto) -> tuple[str, ...]:
        """Non-empty inputs of an indexed node, plus the outer names its subgraphs read."""
        return self._inputs[self._position(node)]

    def find_node(self, label: str) -> onnx.NodeProto | None:
        """The node with this label (see :func:`node_label`), or None."""
        position = self._by_label.get(label)
        return None if position is None else self.nodes[position]

    def node(self, label: str) -> onnx.NodeProto:
        """The node with this label; BadInput naming a few real labels when there is none."""
        found = self.find_node(label)
        if found is None:
            examples = ", ".join(f"'{name}'" for name in list(self._by_label)[:5])
            raise BadInput(f"The model has no node named '{label}'. Node names look like: {examples}.")
        return found

    def initializer(self, tensor: str) -> onnx.TensorProto | None:
        return self.initializers.get(tensor)

    # -- weights --------------------------------------------------------------------------------

    def weight(self, tensor: str) -> onnx.TensorProto | None:
        """The initializer holding ``tensor`` when it is a weight (module docstring); None otherwise.

        An initializer also listed as a graph input (an overridable default) is no weight.
        """
        return self.weights.get(tensor)

    def is_weight(self, tensor: str) -> bool:
        return tensor in self.weights

    def weight_type(self, tensor: str) -> int:
        """The ``TensorProto`` data type of a weight; ``TensorProto.UNDEFINED`` (0) for anything else."""
        found = self.weights.get(tensor)
        return int(found.data_type) if found is not None else onnx.TensorProto.UNDEFINED

    def weight_value(self, tensor: str) -> np.ndarray:
        """The value of a weight (InvalidModel when its data does not fit its dims).

        KeyError when ``tensor`` is no weight: callers ask :meth:`is_weight` first, so that is a bug.
        """
        found = self.weights.get(tensor)
        if found is None:
            raise KeyError(f"'{tensor}' is not a weight of this graph")
        return tensor_value(found)

    # -- constants ------------------------------------------------------------------------------

    @cached_property
    def constants(self) -> frozenset[str]:
        """Every tensor whose value is fixed at build time (see the module docstring)."""
        known: set[str] = set(self.initializers)
        for node in self.topological_order():
            if node.op_type == "Constant":
                known.update(node.output)
                continue
            if node.op_type in NONDETERMINISTIC_OPS or subgraphs_of(node):
                continue
            inputs = self.inputs_of(node)
            if inputs and all(name in known for name in inputs):
                known.update(name for name in node.output if name)
        return frozenset(known)

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def constant_value(self, tensor: str) -> np.ndarray | None:
        """The value of an initializer or ``Constant`` output (through ``Identity``); None otherwise.

        Constants that only exist after folding (``ConstantOfShape`` outputs, reshaped weights) are
        constant but have no value here: folding them would mean running the graph.
        """
        seen: set[str] = set()
        while tensor not in seen:
            seen.add(tensor)
            init = self.initializers.get(tensor)
            if init is not None:
                return tensor_value(init)
            node = self.producer(tensor)
            if node is None:
                return None
            if node.op_type == "Constant":
                return constant_node_value(node)
            if node.op_type == "Identity" and node.input:
                tensor = node.input[0]
                continue
            return None
        return None

    # -- order ----------------------------------------------------------------------------------

    def topological_order(self) -> tuple[onnx.NodeProto, ...]:
        """Nodes ordered so every producer precedes its consumers (stable: graph order where free).

        Raises InvalidModel naming the nodes on a cycle. Inputs that nothing produces (graph inputs,
        initializers, names from an enclosing scope) count as available from the start.
        """
        return tuple(self.nodes[position] for position in self._order)

    @cached_property
    def _order(self) -> tuple[int, ...]:
        waiting = [0] * len(self.nodes)
        for position in range(len(self.nodes)):
            waiting[position] = sum(
                1 for name in self._inputs[position] if self._producer.get(name, position) != position
            )
        # A heap of ready positions keeps graph order wherever the graph is already sorted.
        ready = [position for position in range(len(self.nodes)) if waiting[position] == 0]
        heapq.heapify(ready)
        order: list[int] = []
        while ready:
            position = heapq.heappop(ready)
            order.append(position)
            for name in self.nodes[position].output:
                for consumer in self._consumers.get(name, ()):
                    if consumer == position:
                        continue
                    waiting[consumer] -= 1
                    if waiting[consumer] == 0:
                        heapq.heappush(ready, consumer)
        if len(order) != len(self.nodes):
            stuck = [node_label(self.nodes[p]) for p in range(len(self.nodes)) if waiting[p] > 0]
            raise InvalidModel(
                f"The ONNX graph has a cycle: nodes {', '.join(stuck[:5])} wait on each other's outputs. "
                "Re-export the model; ONNX graphs must be acyclic."
            )
        return tuple(order)

    @cached_property
    def depths(self) -> dict[str, int]:
        """Longest path (in nodes) from the graph's inputs to each node, by label; constants add nothing.

        Of two branches meeting at an Add, the deeper one is computed last, which is the convolution
        TensorRT and ONNX Runtime fuse the Add into.
        """
        depth = [0] * len(self.nodes)
        for position in self._order:
            longest = 0
            for name in self._inputs[position]:
                producer = self._producer.get(name)
                if producer is not None and producer != position and name not in self.constants:
                    longest = max(longest, depth[producer])
            depth[position] = longest + 1
        return {node_label(self.nodes[position]): depth[position] for position in range(len(self.nodes))}

    # -- regions --------------------------------------------------------------------------------

    def nodes_between(self, sources: Iterable[str], sinks: Iterable[str]) -> tuple[onnx.NodeProto, ...]:
        """The nodes that compute ``sinks`` from ``sources``, in topological order.

        Walks back from the producers of ``sinks`` and stops at ``sources``, graph inputs and constants.
        This maps a fused node of an optimized graph back to the original nodes it replaced: its
        original-named inputs are the sources, its original-named outputs the sinks.
        """
        stop = set(sources)
        found: set[int] = set()
        stack = [name for name in sinks if name not in stop]
        while stack:
            name = stack.pop()
            position = self._producer.get(name)
            if position is None or position in found or name in self.constants:
                continue
            found.add(position)
            stack.extend(input_name for input_name in self._inputs[position] if input_name not in stop)
        return tuple(self.nodes[position] for position in self._order if position in found)

    def _position(self, node: onnx.NodeProto) -> int:
        for name in node.output:
            position = self._producer.get(name)
            if position is not None and self.nodes[position] is node:
                return position
        # A node fetched from the graph again is a new wrapper object: fall back to comparing content.
        for position, candidate in enumerate(self.nodes):
            if candidate == node:
                return position
        raise BadInput(f"Node '{node_label(node)}' is not part of this graph.")
