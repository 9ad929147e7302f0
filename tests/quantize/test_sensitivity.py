"""Layer sensitivity ranking and greedy selection, on a classifier with one deliberately bad range."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import onnx
import pytest

from service.errors import BadInput, JobCancelled
from service.quantize.sensitivity import (
    LayerSensitivity,
    SensitivityMode,
    rank_layer_sensitivity,
    select_layers_to_keep,
)
from service.quantize.skip import SkipSpec
from service.quantize.targets import tensors_to_calibrate
from tests.model_factory import resnet_block_classifier
from tests.quantize.support import amax_by_running

ALL_LAYERS = {"stem_conv", "block_conv1", "block_conv2", "head_conv", "fc1", "fc2"}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return resnet_block_classifier()


@pytest.fixture(scope="module")
def held_out() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(21)
    return [{"input": rng.standard_normal((8, 3, 16, 16)).astype(np.float32)} for _ in range(2)]


@pytest.fixture(scope="module")
def clipped_amax(model: onnx.ModelProto, held_out: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Max-calibrated ranges, except block_conv2's input, clipped to a tenth of its range."""
    amax = amax_by_running(model, tensors_to_calibrate(model), held_out)
    amax["block_relu1_out"] *= 0.1
    return amax


def _replay(batches: list[dict[str, np.ndarray]]) -> Callable[[], Iterator[Mapping[str, np.ndarray]]]:
    def batches_fn() -> Iterator[Mapping[str, np.ndarray]]:
        return iter(batches)

    return batches_fn


def test_quantize_one_ranking_puts_the_clipped_layer_first(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list
) -> None:
    ranking = rank_layer_sensitivity(model, clipped_amax, _replay(held_out))

    assert {r.node for r in ranking} == ALL_LAYERS
    assert ranking[0].node == "block_conv2"
    assert [r.snr_db for r in ranking] == sorted(r.snr_db for r in ranking)
    assert all(-300 <= r.snr_db <= 300 and -1 <= r.cosine <= 1 for r in ranking)
    assert ranking[0].op_type == "Conv"
    assert ranking[0].to_dict()["node"] == "block_conv2"


def test_exclude_one_ranking_also_finds_the_clipped_layer(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list
) -> None:
    ranking = rank_layer_sensitivity(model, clipped_amax, _replay(held_out), mode=SensitivityMode.EXCLUDE_ONE)

    assert ranking[0].node == "block_conv2"
    assert [r.snr_db for r in ranking] == sorted((r.snr_db for r in ranking), reverse=True)


def test_max_layers_bounds_the_evaluations_and_keeps_both_ends(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list
) -> None:
    calls: list[tuple[int, int]] = []

    ranking = rank_layer_sensitivity(
        model, clipped_amax, _replay(held_out), max_layers=3, progress=lambda d, t: calls.append((d, t))
    )

    assert len(ranking) == 3
    assert {"stem_conv", "fc2"} <= {r.node for r in ranking}
    assert calls[-1] == (4, 4) and calls[0] == (1, 4)


def test_skipped_and_head_layers_are_not_ranked(held_out: list) -> None:
    softmax_model = resnet_block_classifier(softmax=True)
    skip = SkipSpec.parse(["first"])
    amax = amax_by_running(softmax_model, tensors_to_calibrate(softmax_model, skip), held_out)

    ranking = rank_layer_sensitivity(softmax_model, amax, _replay(held_out), skip=skip)

    assert {r.node for r in ranking} == ALL_LAYERS - {"stem_conv", "fc2"}


def test_selection_keeps_the_most_sensitive_layer_until_the_bound_holds(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list
) -> None:
    ranking = rank_layer_sensitivity(model, clipped_amax, _replay(held_out))
    full = select_layers_to_keep(
        model, clipped_amax, _replay(held_out), ranking, min_snr_db=None, min_cosine=-1.0
    )
    bound = full.snr_db + 6.0

    result = select_layers_to_keep(
        model, clipped_amax, _replay(held_out), ranking, min_snr_db=bound, min_cosine=None
    )

    assert full.kept_layers == () and full.met and full.evaluations == 1
    assert result.met and result.snr_db >= bound
    assert result.kept_layers[0] == "block_conv2"
    assert result.evaluations == len(result.kept_layers) + 1
    assert set(result.qdq.kept_nodes) == set(result.kept_layers)
    assert result.to_dict()["kept_layers"] == list(result.kept_layers)


def test_unreachable_bound_reports_not_met_after_trying_every_layer(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list
) -> None:
    ranking = rank_layer_sensitivity(model, clipped_amax, _replay(held_out), max_layers=2)

    result = select_layers_to_keep(
        model, clipped_amax, _replay(held_out), ranking, min_snr_db=None, min_cosine=1.0
    )

    assert not result.met
    assert result.kept_layers == tuple(r.node for r in ranking)
    assert result.evaluations == len(ranking) + 1


def test_selection_honours_max_kept(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list
) -> None:
    ranking = rank_layer_sensitivity(model, clipped_amax, _replay(held_out))

    result = select_layers_to_keep(
        model, clipped_amax, _replay(held_out), ranking, min_snr_db=299.0, min_cosine=None, max_kept=1
    )

    assert result.kept_layers == ("block_conv2",) and not result.met


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_snr_db": None, "min_cosine": None}, "needs an accuracy bound"),
        ({"min_snr_db": None, "min_cosine": 1.5}, r"min_cosine must lie in \[-1, 1\]"),
    ],
)
def test_selection_rejects_missing_or_impossible_bounds(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list, kwargs: dict, message: str
) -> None:
    with pytest.raises(BadInput, match=message):
        select_layers_to_keep(model, clipped_amax, _replay(held_out), [], **kwargs)


def test_selection_rejects_a_ranking_of_another_model(
    model: onnx.ModelProto, clipped_amax: dict[str, float], held_out: list
) -> None:
    foreign = [LayerSensitivity(node="conv_17", op_type="Conv", snr_db=1.0, cosine=0.5)]

    with pytest.raises(BadInput, match=r"ranking names layers this model does not quantize: \['conv_17'\]"):
        select_layers_to_keep(
            model, clipped_amax, _replay(held_out), foreign, min_snr_db=10.0, min_cosine=None
        )


def test_batches_that_change_between_passes_are_rejected(model: onnx.ModelProto, clipped_amax: dict) -> None:
    rng = np.random.default_rng(5)

    def fresh_every_time() -> Iterator[Mapping[str, np.ndarray]]:
        yield {"input": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)}

    with pytest.raises(BadInput, match="must yield the same batches on every call"):
        rank_layer_sensitivity(model, clipped_amax, fresh_every_time, max_layers=1)


def test_no_held_out_batches_is_rejected(model: onnx.ModelProto, clipped_amax: dict) -> None:
    with pytest.raises(BadInput, match="yielded no batches"):
        rank_layer_sensitivity(model, clipped_amax, lambda: iter([]))


def test_cancellation_stops_the_ranking(model: onnx.ModelProto, clipped_amax: dict, held_out: list) -> None:
    with pytest.raises(JobCancelled, match="cancelled"):
        rank_layer_sensitivity(model, clipped_amax, _replay(held_out), should_stop=lambda: True)


def test_max_layers_below_one_is_rejected(model: onnx.ModelProto, clipped_amax: dict, held_out: list) -> None:
    with pytest.raises(BadInput, match="max_layers must be at least 1"):
        rank_layer_sensitivity(model, clipped_amax, _replay(held_out), max_layers=0)
