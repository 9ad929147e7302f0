"""Skip lists: parsing, resolution against a model, and the errors a typo gets."""

from __future__ import annotations

import pytest

from service.errors import BadInput
from service.quantize.skip import SkipSpec
from tests.model_factory import resnet_block_classifier


def test_parse_sorts_items_into_keywords_op_types_and_node_names() -> None:
    spec = SkipSpec.parse(["first", "Gemm", "op:ConvTranspose", "node:Relu", "block_conv1", " last "])

    assert spec.first and spec.last
    assert spec.op_types == {"Gemm", "ConvTranspose"}
    assert spec.node_names == {"Relu", "block_conv1"}


def test_first_and_last_resolve_to_the_outermost_weighted_layers() -> None:
    kept = SkipSpec.parse(["first", "last"]).resolve(resnet_block_classifier())

    assert kept == {"stem_conv", "fc2"}


def test_op_type_resolves_to_every_node_of_that_type() -> None:
    assert SkipSpec.parse(["Gemm"]).resolve(resnet_block_classifier()) == {"fc1", "fc2"}


def test_node_names_resolve_to_themselves() -> None:
    assert SkipSpec.parse(["block_conv2", "head_conv"]).resolve(resnet_block_classifier()) == {
        "block_conv2",
        "head_conv",
    }


def test_unknown_node_name_is_rejected_with_close_matches() -> None:
    with pytest.raises(BadInput, match=r"'block_cnv2'.*closest: 'block_conv2'") as caught:
        SkipSpec.parse(["block_cnv2"]).resolve(resnet_block_classifier())

    assert caught.value.details["unknown_nodes"] == ["block_cnv2"]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ("first", "list of strings"),
        ([""], "non-empty strings"),
        (["   "], "non-empty strings"),
        (["op:Comv"], r"names no ONNX operator type\. Did you mean .*Conv"),
    ],
)
def test_malformed_skip_items_are_rejected(items: list[str], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        SkipSpec.parse(items)


def test_unnamed_nodes_are_addressed_by_op_type_and_first_output() -> None:
    model = resnet_block_classifier()
    for n in model.graph.node:
        if n.name in ("fc1", "head_conv"):
            n.name = ""

    kept = SkipSpec.parse(["node:Gemm_fc1_out", "first", "last"]).resolve(model)

    assert kept == {"Gemm_fc1_out", "stem_conv", "fc2"}
    with pytest.raises(BadInput, match="closest: 'Conv_head_conv_out'"):
        SkipSpec.parse(["Conv_head_conv"]).resolve(model)


def test_empty_spec_keeps_nothing() -> None:
    spec = SkipSpec.parse([])

    assert spec.empty
    assert spec.resolve(resnet_block_classifier()) == frozenset()
