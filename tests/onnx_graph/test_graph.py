"""GraphIndex: producers, consumers, constants, order, lookup and regions on real and hand-made graphs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.errors import BadInput, InvalidModel
from service.onnx_graph.graph import GraphIndex, node_label
from tests.model_factory import resnet_block_classifier

FLOAT = TensorProto.FLOAT


def _graph(
    nodes: list[onnx.NodeProto],
    *,
    inputs: tuple[str, ...] = ("x",),
    outputs: tuple[str, ...] = ("y",),
    initializers: tuple[onnx.TensorProto, ...] = (),
) -> onnx.GraphProto:
    return helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, FLOAT, [1, 4]) for name in inputs],
        [helper.make_tensor_value_info(name, FLOAT, None) for name in outputs],
        list(initializers),
    )


def test_producer_and_consumers_follow_the_resnet_block() -> None:
    index = GraphIndex.from_model(resnet_block_classifier())
    producer = index.producer("stem_relu_out")
    assert producer is not None and producer.name == "stem_relu"
    # The stem's output feeds the block's first conv and the residual Add.
    assert [node.name for node in index.consumers("stem_relu_out")] == ["block_conv1", "block_add"]
    assert index.producer("input") is None
    assert index.consumers("no_such_tensor") == ()


def test_use_count_counts_a_graph_output_as_a_use() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Neg", ["r"], ["y"], name="neg"),
    ]
    index = GraphIndex(_graph(nodes, outputs=("y", "r")))
    assert index.use_count("r") == 2
    assert index.use_count("y") == 1
    assert index.use_count("x") == 1


def test_initializers_and_constant_nodes_are_constants_but_graph_inputs_are_not() -> None:
    weight = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const", value_float=2.0),
        helper.make_node("Mul", ["w", "c"], ["wc"], name="scale_weight"),
        helper.make_node("Add", ["x", "wc"], ["y"], name="add"),
    ]
    index = GraphIndex(_graph(nodes, initializers=(weight,)))
    assert index.is_constant("w")
    assert index.is_constant("c")
    assert index.is_constant("wc"), "a node whose inputs are all constant yields a constant"
    assert not index.is_constant("x")
    assert not index.is_constant("y")


def test_constant_of_shape_weights_of_the_zoo_resnet_are_constants(
    zoo_model_path: Callable[[str], Path],
) -> None:
    model = onnx.load(str(zoo_model_path("resnet50")))
    index = GraphIndex.from_model(model)
    first_conv = next(node for node in model.graph.node if node.op_type == "Conv")
    weight_producer = index.producer(first_conv.input[1])
    assert weight_producer is not None and weight_producer.op_type == "ConstantOfShape"
    assert index.is_constant(first_conv.input[1])
    # IR 3 lists every initializer as a graph input too; only the image is a real input.
    assert index.graph_inputs == {"gpu_0/data_0"}


def test_random_ops_are_never_constant_even_with_constant_inputs() -> None:
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["noise"], name="noise"),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], name="zeros"),
        helper.make_node("RandomUniform", [], ["u"], name="uniform", shape=[1, 4]),
        helper.make_node("Sum", ["noise", "zeros", "u"], ["y"], name="sum"),
    ]
    index = GraphIndex(_graph(nodes, initializers=(shape,)))
    assert index.is_constant("zeros")
    assert not index.is_constant("u")
    assert not index.is_constant("noise")


def test_constant_value_reads_initializers_constant_nodes_and_identities() -> None:
    low = numpy_helper.from_array(np.array(0.0, np.float32), "low")
    nodes = [
        helper.make_node(
            "Constant", [], ["high"], name="high", value=numpy_helper.from_array(np.array(6.0, np.float32))
        ),
        helper.make_node("Identity", ["high"], ["high_copy"], name="copy"),
        helper.make_node("Constant", [], ["ints"], name="ints", value_ints=[1, 2]),
        helper.make_node("Neg", ["low"], ["folded"], name="neg"),
        helper.make_node("Clip", ["x", "low", "high_copy"], ["y"], name="clip"),
    ]
    index = GraphIndex(_graph(nodes, initializers=(low,)))
    assert index.constant_value("low") == pytest.approx(0.0)
    assert index.constant_value("high_copy") == pytest.approx(6.0)
    np.testing.assert_array_equal(index.constant_value("ints"), [1, 2])
    # Constant, but its value exists only after running the graph.
    assert index.is_constant("folded") and index.constant_value("folded") is None
    assert index.constant_value("x") is None


def test_topological_order_sorts_an_unsorted_graph_and_keeps_a_sorted_one() -> None:
    nodes = [
        helper.make_node("Neg", ["b"], ["y"], name="last"),
        helper.make_node("Relu", ["a"], ["b"], name="middle"),
        helper.make_node("Abs", ["x"], ["a"], name="first"),
    ]
    index = GraphIndex(_graph(nodes))
    assert [node.name for node in index.topological_order()] == ["first", "middle", "last"]
    model = resnet_block_classifier()
    assert [n.name for n in GraphIndex.from_model(model).topological_order()] == [
        n.name for n in model.graph.node
    ]


def test_a_cycle_is_rejected_with_the_nodes_on_it() -> None:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="left"),
        helper.make_node("Relu", ["a"], ["b"], name="right"),
        helper.make_node("Neg", ["b"], ["y"], name="out"),
    ]
    with pytest.raises(InvalidModel, match=r"cycle: nodes left, right"):
        GraphIndex(_graph(nodes)).topological_order()


def test_node_lookup_by_label_and_a_helpful_error_for_unknown_names() -> None:
    index = GraphIndex.from_model(resnet_block_classifier())
    assert index.node("block_bn2").op_type == "BatchNormalization"
    assert index.find_node("nope") is None
    with pytest.raises(BadInput, match=r"no node named 'nope'\. Node names look like: 'stem_conv'"):
        index.node("nope")


def test_unnamed_nodes_are_labelled_by_op_type_and_first_output() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["relu_out"]),
        helper.make_node("Neg", ["relu_out"], ["y"], name="neg"),
    ]
    index = GraphIndex(_graph(nodes))
    assert node_label(nodes[0]) == "Relu_relu_out"
    assert index.node("Relu_relu_out").op_type == "Relu"
    assert node_label(nodes[1]) == "neg"


def test_tensors_read_inside_a_subgraph_count_as_inputs_of_the_owning_node() -> None:
    branch = helper.make_graph(
        [helper.make_node("Neg", ["outer"], ["branch_out"], name="inner_neg")],
        "branch",
        [],
        [helper.make_tensor_value_info("branch_out", FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("Relu", ["x"], ["outer"], name="relu"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch, else_branch=branch),
    ]
    index = GraphIndex(_graph(nodes, initializers=(cond,)))
    assert [node.name for node in index.consumers("outer")] == ["if"]
    assert index.inputs_of(index.node("if")) == ("cond", "outer")
    assert not index.is_constant("y"), "nodes with subgraphs are never folded"


def test_nodes_between_recovers_what_a_fused_node_replaced() -> None:
    model = resnet_block_classifier()
    index = GraphIndex.from_model(model)
    # ONNX Runtime's FusedConv reads the stem's output and writes block_relu1's output.
    region = index.nodes_between(["stem_relu_out"], ["block_relu1_out"])
    assert [node.name for node in region] == ["block_conv1", "block_bn1", "block_relu1"]
    assert index.nodes_between(["x"], ["x"]) == ()


def test_depths_make_the_longer_branch_of_a_residual_block_deeper() -> None:
    index = GraphIndex.from_model(resnet_block_classifier())
    depths = index.depths
    # block_bn2 ends the two-conv branch; stem_relu is the shortcut into the same Add.
    assert depths["block_bn2"] > depths["stem_relu"]
    assert depths["stem_conv"] == 1, "weights do not add depth"


@pytest.mark.parametrize("damage", ["extra_values", "unknown_dtype"])
def test_a_constant_whose_data_does_not_fit_its_dims_is_an_invalid_model_not_a_crash(damage: str) -> None:
    # Found by the protobuf fuzzer: the ONNX checker passes such a model, numpy's reshape then raised.
    from service.onnx_graph.fusions import analyze_fusions

    model = resnet_block_classifier()
    clip_min = next(init for init in model.graph.initializer if init.name == "clip_min")
    if damage == "extra_values":
        clip_min.CopyFrom(numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "clip_min"))
        del clip_min.dims[:]  # declared a scalar, holds two values
        onnx.checker.check_model(model)  # the checker lets it through
    else:
        clip_min.data_type = -1
    with pytest.raises(InvalidModel, match="clip_min"):
        analyze_fusions(model)
    assert issubclass(InvalidModel, BadInput)  # so an upload answers 400


def _if_reading(outer: str, name: str = "if", out: str = "branch_out") -> onnx.NodeProto:
    """An If node both of whose bodies read ``outer`` from the enclosing graph."""
    body = helper.make_graph(
        [helper.make_node("Neg", [outer], [f"{name}_inner"], name=f"{name}_neg")],
        "body",
        [],
        [helper.make_tensor_value_info(f"{name}_inner", FLOAT, None)],
    )
    return helper.make_node("If", ["cond"], [out], name=name, then_branch=body, else_branch=body)


def test_a_weight_is_an_initializer_the_graph_always_uses() -> None:
    weight = numpy_helper.from_array(np.full((1, 4), 2.0, np.float32), "w")
    default = numpy_helper.from_array(np.ones((1, 4), np.float32), "d")
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const", value_float=2.0),
        helper.make_node("Mul", ["x", "w"], ["xw"], name="mul"),
        helper.make_node("Add", ["xw", "d"], ["xd"], name="add"),
        helper.make_node("Sub", ["xd", "c"], ["y"], name="sub"),
    ]
    # IR >= 4: an initializer also listed as a graph input is a default the caller may override.
    index = GraphIndex(_graph(nodes, inputs=("x", "d"), initializers=(weight, default)))

    assert index.is_weight("w") and index.weight("w") is index.initializers["w"]
    np.testing.assert_array_equal(index.weight_value("w"), np.full((1, 4), 2.0, np.float32))
    assert index.weight_type("w") == TensorProto.FLOAT
    assert not index.is_weight("d") and index.weight("d") is None, "an overridable default is no weight"
    assert index.is_constant("d"), "for fusion analysis it still counts as constant, as TensorRT folds it"
    assert "d" not in index.graph_inputs
    assert index.is_constant("c") and not index.is_weight("c"), "a Constant output has no stored tensor"
    assert not index.is_weight("x") and index.weight_type("x") == TensorProto.UNDEFINED
    with pytest.raises(KeyError, match="'d' is not a weight"):
        index.weight_value("d")


def test_a_constant_node_value_float_is_float32_as_its_schema_types_it() -> None:
    nodes = [helper.make_node("Constant", [], ["c"], name="const", value_floats=[0.1, 6.0])]
    value = GraphIndex(_graph(nodes, outputs=("c",))).constant_value("c")
    assert value is not None and value.dtype == np.float32
    np.testing.assert_array_equal(value, np.array([0.1, 6.0], np.float32))


def test_a_tensor_an_if_body_also_reads_has_no_sole_reader() -> None:
    cond = numpy_helper.from_array(np.array(True), "cond")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Neg", ["r"], ["n"], name="neg"),
        _if_reading("r"),
        helper.make_node("Add", ["n", "branch_out"], ["y"], name="add"),
    ]
    index = GraphIndex(_graph(nodes, initializers=(cond,)))

    assert [node.name for node in index.consumers("r")] == ["neg", "if"], "the body's owner needs r too"
    assert [node.name for node in index.readers("r")] == ["neg"], "only neg has an input slot to rewrite"
    assert index.sole_reader("r") is None
    sole = index.sole_reader("n")
    assert sole is not None and sole.name == "add"


def test_a_tensor_read_twice_by_one_node_or_returned_has_no_sole_reader() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Add", ["r", "r"], ["s"], name="twice"),
        helper.make_node("Neg", ["s"], ["y"], name="neg"),
    ]
    index = GraphIndex(_graph(nodes, outputs=("y", "s")))
    assert [node.name for node in index.readers("r")] == ["twice"]
    assert index.sole_reader("r") is None, "Add(r, r) reads r through two slots"
    assert index.sole_reader("s") is None, "a graph output is needed outside the graph"
    assert index.sole_reader("y") is None


def test_subgraph_reads_see_nested_bodies_and_outer_names_returned_directly() -> None:
    from service.onnx_graph.subgraphs import subgraph_reads

    passthrough = helper.make_graph(
        [], "passthrough", [], [helper.make_tensor_value_info("kept", FLOAT, None)]
    )
    inner_if = helper.make_node(
        "If", ["cond"], ["inner_out"], name="inner_if", then_branch=passthrough, else_branch=passthrough
    )
    outer_body = helper.make_graph(
        [helper.make_node("Neg", ["deep"], ["local"], name="local_neg"), inner_if],
        "outer_body",
        [],
        [helper.make_tensor_value_info("inner_out", FLOAT, None)],
    )
    graph = _graph(
        [
            helper.make_node(
                "If", ["cond"], ["y"], name="outer_if", then_branch=outer_body, else_branch=outer_body
            )
        ],
        inputs=("x", "deep", "kept", "cond"),
    )
    # "local" is defined inside the body, so it is no read of the outer scope.
    assert subgraph_reads(graph) == {"deep", "kept", "cond"}
