"""BatchNormalization folding: numerics against ONNX Runtime, structure, and the cases left alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from service.quantize.bn_fold import batchnorm_folding, fold_batchnorm
from tests.model_factory import resnet_block_classifier
from tests.quantize import graphs
from tests.quantize.support import node, rapidocr_model, run


@pytest.mark.parametrize("opset", [9, 13, 17, 21])
def test_folding_the_classifier_removes_every_batchnorm_and_keeps_outputs(opset: int) -> None:
    model = resnet_block_classifier(opset=opset)
    folded = fold_batchnorm(model)

    onnx.checker.check_model(folded, full_check=True)
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    x = np.random.default_rng(opset).standard_normal((4, 3, 16, 16)).astype(np.float32)
    expected, got = run(model, {"input": x})[0], run(folded, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def test_folded_convolution_takes_over_the_batchnorm_output_name() -> None:
    folded = fold_batchnorm(resnet_block_classifier())

    conv = node(folded, "block_conv2")
    assert conv.output[0] == "block_bn2_out"
    assert node(folded, "block_add").input[0] == "block_bn2_out"
    names = {t.name for t in folded.graph.initializer}
    assert "block_conv2.folded_weight" in names and "block_conv2.folded_bias" in names
    assert "block_bn2.scale" not in names and "block_conv2.weight" not in names


def test_folding_reports_what_it_folded_and_why_it_kept_the_rest() -> None:
    result = batchnorm_folding(graphs.batchnorm_cases())

    assert {(f.batchnorm, f.conv) for f in result.folded} == {("bn_ct", "ct"), ("bn_plain", "plain")}
    reasons = {k.batchnorm: k.reason for k in result.kept}
    assert set(reasons) == {"bn_shared", "bn_dyn"}
    assert "other readers" in reasons["bn_shared"]
    assert "not a constant" in reasons["bn_dyn"]
    remaining = {n.name for n in result.model.graph.node if n.op_type == "BatchNormalization"}
    assert remaining == {"bn_shared", "bn_dyn"}


def test_grouped_conv_transpose_and_biasless_conv_fold_exactly() -> None:
    model = graphs.batchnorm_cases()
    folded = fold_batchnorm(model)
    feeds = {
        "x": np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32),
        "gamma": np.linspace(0.5, 1.5, 4).astype(np.float32),
    }

    for expected, got in zip(run(model, feeds), run(folded, feeds), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
    assert len(node(folded, "plain").input) == 3  # a bias was created for the biasless Conv


def test_folding_leaves_the_input_model_untouched() -> None:
    model = resnet_block_classifier()
    before = model.SerializeToString()

    fold_batchnorm(model)

    assert model.SerializeToString() == before


def test_old_ir_model_with_computed_weights_folds_every_batchnorm() -> None:
    # The onnx model zoo "light" ResNet-50 (IR 3) lists its BatchNormalization parameters as graph inputs
    # and computes every Conv weight with ConstantOfShape; the canonical form folds those into initializers.
    import onnx.backend.test

    path = onnx.backend.test.__path__[0] + "/data/light/light_resnet50.onnx"
    model = onnx.load(path)
    result = batchnorm_folding(model)

    assert len(result.folded) == sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert not result.kept
    onnx.checker.check_model(result.model)
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    expected, got = run(model, {"gpu_0/data_0": x})[0], run(result.model, {"gpu_0/data_0": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_recognizer_batchnorms_fold_within_float_rounding() -> None:
    model = onnx.load(rapidocr_model("PP-OCRv6_rec_small.onnx"))
    result = batchnorm_folding(model)
    x = np.random.default_rng(2).standard_normal((1, 3, 48, 96)).astype(np.float32)

    assert len(result.folded) == 3 and not result.kept
    expected, got = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_classifier_with_constant_node_weights_folds_all_batchnorms() -> None:
    # The PP-OCR direction classifier stores every weight and BN parameter in Constant nodes.
    model = onnx.load(rapidocr_model("ch_ppocr_mobile_v2.0_cls_mobile.onnx"))
    result = batchnorm_folding(model)
    x = np.random.default_rng(3).standard_normal((2, 3, 48, 192)).astype(np.float32)

    assert not result.kept and len(result.folded) == 35
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-6)
