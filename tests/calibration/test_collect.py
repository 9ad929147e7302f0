"""Streaming activation collection through real ONNX Runtime CPU sessions."""

from __future__ import annotations

import gc
import pathlib
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from service.calibration.algorithms import CALIBRATION_METHODS, thresholds_from_histograms
from service.calibration.collect import collect_histograms, model_with_outputs, plan_collection
from service.calibration.histograms import AbsHistogramAccumulator, abs_histogram_from_arrays
from service.calibration.probes import DEFAULT_SAMPLE_ELEMENTS
from service.errors import BadInput, InvalidCalibrationSet, InvalidModel, JobCancelled
from tests.model_factory import resnet_block_classifier, two_input_adder

Feeds = Mapping[str, np.ndarray]


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def _batches(data: np.ndarray, batch: int, name: str = "input") -> Iterator[Feeds]:
    for start in range(0, len(data), batch):
        yield {name: data[start : start + batch]}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return resnet_block_classifier()


@pytest.fixture(scope="module")
def all_tensors(model: onnx.ModelProto) -> list[str]:
    return ["input", *(node.output[0] for node in model.graph.node)]


def test_same_samples_in_any_batch_size_or_order_give_identical_thresholds(
    model: onnx.ModelProto, all_tensors: list[str]
) -> None:
    data = _images(24)
    reference = collect_histograms(model, lambda: _batches(data, 24), all_tensors, intra_op_threads=1)
    expected = {m: thresholds_from_histograms(reference, m) for m in CALIBRATION_METHODS}
    rng = np.random.default_rng(1)
    for batch in (1, 5, 16):
        shuffled = data[rng.permutation(len(data))]
        hists = collect_histograms(model, partial(_batches, shuffled, batch), all_tensors)
        assert all(hists[name] == reference[name] for name in all_tensors)
        assert {m: thresholds_from_histograms(hists, m) for m in CALIBRATION_METHODS} == expected


def test_histograms_match_activations_computed_by_a_separate_session(model: onnx.ModelProto) -> None:
    data = _images(12, seed=2)
    stem = ["stem_conv_out", "stem_bn_out", "stem_relu_out"]
    hists = collect_histograms(model, lambda: _batches(data, 4), [*stem, "input", "logits"], num_bins=512)
    assert hists["input"] == abs_histogram_from_arrays([data], num_bins=512)  # fed, not computed

    # The reference: the stem cut out with onnx.utils and the plain model, unoptimized, on all data
    # at once. Collection runs ONNX Runtime's full optimizations (fusions, NCHWc kernels whose
    # blocking differs), so activations agree to float32 rounding, not bit for bit.
    extracted = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model(["input"], stem)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    stem_session = onnxruntime.InferenceSession(extracted.SerializeToString(), options)
    full_session = onnxruntime.InferenceSession(model.SerializeToString(), options)
    expected = dict(zip(stem, stem_session.run(stem, {"input": data}), strict=True))
    expected["logits"] = full_session.run(["logits"], {"input": data})[0]
    for name, values in expected.items():
        reference = abs_histogram_from_arrays([values], num_bins=512)
        assert hists[name].count == values.size, name
        assert hists[name].observed_max == pytest.approx(reference.observed_max, rel=1e-5), name
        for method in CALIBRATION_METHODS:
            ours = thresholds_from_histograms({name: hists[name]}, method)[name]
            theirs = thresholds_from_histograms({name: reference}, method)[name]
            assert ours == pytest.approx(theirs, rel=1e-4), (name, method)


def test_collection_works_with_static_batch_dims_declared_by_the_exporter() -> None:
    static = resnet_block_classifier(batch=1)
    data = _images(3, seed=3)
    hists = collect_histograms(static, lambda: _batches(data, 1), ["block_add_out", "logits"])
    assert hists["block_add_out"].count == 3 * 8 * 16 * 16
    assert hists["logits"].count == 3 * 10


def test_a_trained_ocr_model_with_symbolic_dims_is_calibrated() -> None:
    rapidocr = pytest.importorskip("rapidocr")
    path = pathlib.Path(rapidocr.__file__).parent / "models" / "ch_ppocr_mobile_v2.0_cls_mobile.onnx"
    if not path.is_file():
        pytest.skip(f"rapidocr does not ship {path.name}")
    skimage_data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    ocr = onnx.load(path)
    convs = [node.output[0] for node in ocr.graph.node if node.op_type == "Conv"]
    text = transform.resize(skimage_data.text().astype(np.float32) / 255.0, (48, 192))
    line = np.repeat(((text - 0.5) / 0.5)[None, None], 3, axis=1)
    data = np.concatenate([line, line[..., ::-1], 0.8 * line, -line]).astype(np.float32)
    hists = collect_histograms(ocr, lambda: _batches(data, 2, name="x"), convs, intra_op_threads=1)
    thresholds = thresholds_from_histograms(hists, "entropy")
    assert list(thresholds) == convs
    assert all(0 < thresholds[n] <= hists[n].observed_max for n in convs)


def test_graph_inputs_and_outputs_need_no_extra_outputs(model: onnx.ModelProto) -> None:
    plan = plan_collection(model, ["input", "logits", "stem_relu_out", "logits"])
    assert plan.tensor_names == ("input", "logits", "stem_relu_out")
    assert plan.from_feeds == ("input",)
    augmented = model_with_outputs(model, plan.fetches)
    assert [o.name for o in augmented.graph.output] == ["logits", "stem_relu_out"]
    assert [o.name for o in model.graph.output] == ["logits"]  # the caller's model is untouched


def test_progress_counts_samples_in_one_pass(model: onnx.ModelProto) -> None:
    data = _images(10, seed=4)
    known: list[tuple[int, int]] = []
    collect_histograms(
        model, lambda: _batches(data, 4), ["logits"], total_samples=10, progress=_record(known)
    )
    assert known == [(4, 10), (8, 10), (10, 10)]

    unknown: list[tuple[int, int]] = []
    collect_histograms(model, lambda: _batches(data, 4), ["logits"], progress=_record(unknown))
    assert unknown == [(4, 4), (8, 8), (10, 10)]


def _record(calls: list[tuple[int, int]]) -> Callable[[int, int], None]:
    return lambda done, total: calls.append((done, total))


def test_should_stop_cancels_the_job_between_batches(model: onnx.ModelProto) -> None:
    data = _images(12, seed=5)
    calls: list[tuple[int, int]] = []
    with pytest.raises(JobCancelled, match=r"cancelled after 8 of 12 samples"):
        collect_histograms(
            model,
            lambda: _batches(data, 4),
            ["logits"],
            total_samples=12,
            progress=_record(calls),
            should_stop=lambda: len(calls) >= 2,
        )
    assert calls[-1] == (8, 12)


def test_peak_memory_does_not_grow_with_the_number_of_samples(
    model: onnx.ModelProto, all_tensors: list[str]
) -> None:
    def fresh_batches(count: int) -> Iterator[Feeds]:
        for index in range(count):  # a new array per batch, as a memory-mapped dataset yields
            yield {"input": np.random.default_rng(index).standard_normal((8, 3, 16, 16)).astype(np.float32)}

    def peak(count: int) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            collect_histograms(model, lambda: fresh_batches(count), all_tensors, intra_op_threads=1)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(6), peak(60)
    activations_per_batch = 8 * (3 + 16 * 8 + 16) * 16 * 16 * 4  # ~1.2 MB; 60 batches would be ~70 MB
    assert large < 1.5 * small + activations_per_batch


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "No tensors to calibrate"),
        (["nope"], "Tensor 'nope' is not produced by the main graph"),
        (["stem_conv.weight"], "'stem_conv.weight' is an initializer"),
    ],
)
def test_unusable_tensor_names_are_rejected(model: onnx.ModelProto, names: list[str], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        collect_histograms(model, lambda: _batches(_images(2), 2), names)


def test_integer_tensors_are_rejected_before_any_inference() -> None:
    node = helper.make_node("Shape", ["x"], ["shape"], name="shape")
    graph = helper.make_graph(
        [node],
        "shape_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
    )
    shape_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInput, match="'shape' holds INT64 values; only float tensors"):
        collect_histograms(shape_model, lambda: iter(()), ["shape"])


def test_a_model_onnx_runtime_cannot_load_is_reported_as_invalid() -> None:
    broken = two_input_adder()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InvalidModel, match="ONNX Runtime cannot load the model"):
        collect_histograms(broken, lambda: iter(()), ["relu_out"])


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        (
            {"image": np.zeros((1, 3, 8, 8), np.float32)},
            r"batch 0 does not match the model's inputs.*missing \['bias_map'\]",
        ),
        (
            {
                "image": np.zeros((1, 3, 8, 8), np.float32),
                "bias_map": np.zeros((1, 4, 8, 8)),
            },
            "ONNX Runtime could not run calibration batch 0",
        ),
        (
            {
                "image": np.zeros((1, 3, 8, 8), np.float32),
                "bias_map": np.zeros((1, 4, 8, 8), np.float32),
                "extra": np.zeros(1),
            },
            r"unexpected \['extra'\]",
        ),
    ],
    ids=["missing-input", "float64-input", "unexpected-input"],
)
def test_batches_that_do_not_fit_the_model_are_rejected(feeds: Feeds, message: str) -> None:
    with pytest.raises(InvalidCalibrationSet, match=message):
        collect_histograms(two_input_adder(), lambda: iter([feeds]), ["relu_out", "out"])


def test_empty_calibration_data_is_rejected(model: onnx.ModelProto) -> None:
    with pytest.raises(InvalidCalibrationSet, match="yielded no samples"):
        collect_histograms(model, lambda: iter(()), ["logits"])


def test_data_is_read_once_so_a_rerun_with_slightly_larger_values_cannot_fail_the_build(
    model: onnx.ModelProto,
) -> None:
    # Regression: the two-pass design failed with "reached |x| = 0.857897 on the second calibration
    # pass, above the maximum 0.85789" when ONNX Runtime's second run differed in the last digits.
    # Here every read of the data comes out 1e-6 larger than the one before.
    data = _images(6, seed=6)
    reads: list[int] = []

    def drifting() -> Iterator[Feeds]:
        reads.append(1)
        return _batches(data * np.float32(1 + 1e-6 * len(reads)), 2)

    hists = collect_histograms(model, drifting, ["input", "stem_relu_out"])
    assert len(reads) == 1
    assert hists["input"].observed_max == float(np.abs(data * np.float32(1 + 1e-6)).max())
    assert hists["input"].observed_max <= hists["input"].range_max


def test_non_finite_activations_are_rejected_with_the_tensor_name(model: onnx.ModelProto) -> None:
    data = _images(2, seed=8)
    data[1, 0, 0, 0] = np.nan
    with pytest.raises(InvalidCalibrationSet, match="'stem_conv_out' produced NaN or infinite values"):
        collect_histograms(model, lambda: _batches(data, 2), ["stem_conv_out"])


def test_invalid_options_are_rejected(model: onnx.ModelProto) -> None:
    with pytest.raises(BadInput, match="num_bins must be at least 1"):
        collect_histograms(model, lambda: iter(()), ["logits"], num_bins=0)
    with pytest.raises(BadInput, match="intra_op_threads must be at least 1"):
        collect_histograms(model, lambda: iter(()), ["logits"], intra_op_threads=0)


def test_large_batches_are_cut_to_the_activation_budget_without_changing_results(
    model: onnx.ModelProto, all_tensors: list[str]
) -> None:
    data = _images(128)

    def peak_and_histograms(budget: int) -> tuple[int, dict[str, object]]:
        gc.collect()
        tracemalloc.start()
        hists = collect_histograms(
            model,
            lambda: _batches(data, 128),
            all_tensors,
            num_bins=128,  # small grids (32 KiB per tensor): the binning temporaries dominate
            intra_op_threads=1,
            activation_budget_bytes=budget,
        )
        peak = tracemalloc.get_traced_memory()[1]  # numpy's binning temporaries; ONNX Runtime's own
        tracemalloc.stop()  # allocations (its outputs included) are invisible to tracemalloc
        return peak, dict(hists)

    whole_peak, whole = peak_and_histograms(1 << 40)  # one run of all 128 samples
    cut_peak, cut = peak_and_histograms(1)  # one sample per run
    assert cut == whole
    assert cut_peak < whole_peak / 4


def _relu_model() -> onnx.ModelProto:
    """x [N, 12, 256, 256] -> Relu -> y: 3 * DEFAULT_SAMPLE_ELEMENTS values per sample."""
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = helper.make_graph(
        [node],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 256, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, 256, 256])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_large_tensors_are_subsampled_per_sample_with_the_exact_max() -> None:
    assert 3 * DEFAULT_SAMPLE_ELEMENTS == 12 * 256 * 256  # so the step is 3
    data = np.random.default_rng(9).standard_normal((4, 12, 256, 256)).astype(np.float32)
    data[2, 0, 0, 1] = 40.0  # the max sits at a position the step-3 sample skips
    hists = {
        batch: collect_histograms(
            _relu_model(), partial(_batches, data, batch, "x"), ["y"], intra_op_threads=1
        )
        for batch in (1, 4)
    }
    assert hists[1]["y"] == hists[4]["y"]

    expected = AbsHistogramAccumulator(name="y")
    expected.update(np.maximum(data, 0).reshape(4, -1)[:, ::3])
    expected.observe_max(40.0)
    assert hists[1]["y"] == expected.result()
    assert hists[1]["y"].count == 4 * DEFAULT_SAMPLE_ELEMENTS
    assert hists[1]["y"].observed_max == 40.0


def test_a_nan_outside_the_subsample_is_still_reported() -> None:
    data = np.ones((1, 12, 256, 256), np.float32)
    data[0, 0, 0, 1] = np.nan
    with pytest.raises(InvalidCalibrationSet, match="'y' produced NaN or infinite values"):
        collect_histograms(_relu_model(), lambda: _batches(data, 1, "x"), ["y"])
