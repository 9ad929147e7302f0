"""The one walker over subgraphs (``If``/``Loop``/``Scan`` bodies) and the outer names they read.

A body may read a tensor of an enclosing graph by name without declaring it. Every question of the
form "is this tensor still needed" or "who reads this tensor" must count those reads, or a rewrite
of the outer graph (bypassing an Identity, dropping a folded initializer, treating a tensor as read
once) silently breaks the body. ONNX forbids a body to redefine an outer name, so a name a body
defines itself never collides with one of the outer graph.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx


def subgraphs_of(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The bodies a node owns (its GRAPH and GRAPHS attributes), in attribute order."""
    graphs: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def outer_references(body: onnx.GraphProto) -> set[str]:
    """Names ``body`` (or a body nested in it) reads without defining them: resolved in an enclosing scope.

    A body output that names an outer tensor directly counts as a read of it.
    """
    defined = {value.name for value in body.input} | {init.name for init in body.initializer}
    referenced: set[str] = set()
    for node in body.node:
        referenced.update(name for name in node.input if name)
        for sub in subgraphs_of(node):
            referenced |= outer_references(sub)
        defined.update(node.output)
    referenced.update(value.name for value in body.output)
    return referenced - defined


def subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """The names of ``graph``'s scope that the bodies of its nodes read (at any depth of nesting)."""
    names: set[str] = set()
    for node in graph.node:
        for body in subgraphs_of(node):
            names |= outer_references(body)
    return names


def names_read(graph: onnx.GraphProto, *, ignoring: Collection[onnx.NodeProto] = ()) -> set[str]:
    """Every name ``graph`` still needs: its nodes' inputs, what their bodies read, and its outputs.

    ``ignoring`` leaves out nodes about to be removed (by identity), so what only they read counts
    as free. A rewrite that drops an initializer or an input asks this first.
    """
    skipped = {id(node) for node in ignoring}
    names = {value.name for value in graph.output}
    for node in graph.node:
        if id(node) in skipped:
            continue
        names.update(name for name in node.input if name)
        for body in subgraphs_of(node):
            names |= outer_references(body)
    return names
