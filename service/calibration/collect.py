"""Activation histograms through ONNX Runtime on the CPU, streamed batch by batch.

``collect_histograms`` exposes the requested tensors as extra graph outputs, opens one CPU
``InferenceSession`` and makes two passes over the calibration data:

1. the exact max |x| of every tensor;
2. a ``num_bins`` histogram of |x| over ``[0, that max]`` per tensor.

Each batch's activations are folded into running maxima or counts and dropped, so memory is one
batch's activations plus fixed-size histograms, however many samples there are. Because the range
is fixed before counting, the histograms (and every threshold from them) depend only on the multiset
of samples, not on batch size or order, unlike TensorRT's own calibrator whose histogram range grows
with what it has seen so far.

``batches`` is a factory: each call starts a fresh pass and must yield the same samples. Progress is
reported as ``(samples done, total)`` over both passes: ``total`` is ``2 * total_samples`` when the
caller knows the count, 0 ("unknown") during the first pass otherwise, and ``2 * N`` once the first
pass has counted N samples. A batch's sample count is its first input's leading dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from service.calibration.histograms import DEFAULT_NUM_BINS, AbsHistogram, AbsHistogramAccumulator, max_abs
from service.errors import BadInput, InvalidCalibrationSet, InvalidModel, JobCancelled
from service.onnx_graph.inspect import model_inputs

# Activations fetched by one session run: a 640x640 detector produces ~270 MiB of them per sample,
# so whole batches of 8 would cost ~2 GiB; runs are cut to stay near this.
DEFAULT_ACTIVATION_BUDGET_BYTES = 256 * 1024 * 1024

if TYPE_CHECKING:
    import onnxruntime

BatchFactory = Callable[[], Iterable[Mapping[str, np.ndarray]]]
ProgressCallback = Callable[[int, int], None]
StopCheck = Callable[[], bool]

_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


@dataclass(frozen=True)
class CollectionPlan:
    """Where each requested tensor comes from: a feed (graph input) or a session output."""

    tensor_names: tuple[str, ...]
    from_feeds: tuple[str, ...]
    fetches: tuple[str, ...]
    fetch_types: tuple[int, ...]  # ONNX element type per fetch; UNDEFINED where inference found none
    model_inputs: tuple[str, ...]


def collect_histograms(
    model: onnx.ModelProto,
    batches: BatchFactory,
    tensor_names: Sequence[str],
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    total_samples: int | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
    intra_op_threads: int | None = None,
    activation_budget_bytes: int = DEFAULT_ACTIVATION_BUDGET_BYTES,
) -> dict[str, AbsHistogram]:
    """Histogram of |x| for each of ``tensor_names`` over the calibration data, in that order.

    Each session run fetches every requested activation for all the samples it is given, so a
    batch is cut into runs of at most as many samples as fit ``activation_budget_bytes`` (learned
    from the first run of one sample) when the model's batch dimension allows it. The result does
    not depend on the cut: histograms are order- and batch-independent by construction.

    Raises BadInput for unknown or non-float tensors, InvalidModel when ONNX Runtime cannot load
    the model, InvalidCalibrationSet when the batches do not fit the model, are empty, or change
    between passes, and JobCancelled as soon as ``should_stop()`` returns true.
    """
    if num_bins < 1:
        raise BadInput(f"num_bins must be at least 1, got {num_bins}; 2048 is the standard.")
    plan = plan_collection(model, tensor_names)
    fetch_types = dict(zip(plan.fetches, plan.fetch_types, strict=True))
    augmented = model_with_outputs(model, plan.fetches, elem_types=fetch_types)
    session = _open_session(augmented, intra_op_threads)
    del augmented  # ONNX Runtime holds its own copy
    splittable = not any(
        spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 1 for spec in model_inputs(model)
    )
    runner = _PassRunner(
        plan, session, progress, should_stop, activation_budget_bytes if splittable else None
    )

    maxima = dict.fromkeys(plan.tensor_names, 0.0)

    def fold_max(name: str, values: np.ndarray) -> None:
        maxima[name] = max(maxima[name], max_abs(values, name=name))

    first_total = 2 * total_samples if total_samples is not None else 0
    samples = runner.run_pass(batches, fold_max, done_before=0, total=first_total)
    if samples == 0:
        raise InvalidCalibrationSet("The calibration data yielded no samples; upload at least one sample.")

    accumulators = {
        name: AbsHistogramAccumulator(maxima[name], num_bins, name=name) for name in plan.tensor_names
    }

    def fold_counts(name: str, values: np.ndarray) -> None:
        accumulators[name].update(values)

    second = runner.run_pass(batches, fold_counts, done_before=samples, total=2 * samples)
    if second != samples:
        raise InvalidCalibrationSet(
            f"The calibration data yielded {samples} samples on the first pass and {second} on the "
            "second; it must yield the same samples every time it is read."
        )
    return {name: accumulators[name].result() for name in plan.tensor_names}


def plan_collection(model: onnx.ModelProto, tensor_names: Sequence[str]) -> CollectionPlan:
    """Check the requested names against the graph and decide how to obtain each tensor."""
    names = tuple(dict.fromkeys(tensor_names))  # drop duplicates, keep order
    if not names:
        raise BadInput("No tensors to calibrate were given; name at least one activation tensor.")
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    produced = {out for node in graph.node for out in node.output if out}
    types = _elem_types(model)

    for name in names:
        if name in initializers:
            raise BadInput(
                f"'{name}' is an initializer (a constant weight), not an activation; "
                "weights are quantized from their values, not calibrated."
            )
        if name not in produced and name not in inputs:
            known = sorted(produced | set(inputs))
            raise BadInput(
                f"Tensor '{name}' is not produced by the main graph of the model (tensors inside "
                f"If/Loop bodies cannot be calibrated). Known tensors include: {', '.join(known[:8])}"
                + (" ..." if len(known) > 8 else "")
            )
        elem_type = types.get(name, onnx.TensorProto.UNDEFINED)
        if elem_type not in _FLOAT_TYPES and elem_type != onnx.TensorProto.UNDEFINED:
            type_name = onnx.TensorProto.DataType.Name(elem_type)
            raise BadInput(f"Tensor '{name}' holds {type_name} values; only float tensors can be calibrated.")

    input_set = set(inputs)
    fetches = tuple(n for n in names if n not in input_set)
    return CollectionPlan(
        tensor_names=names,
        from_feeds=tuple(n for n in names if n in input_set),
        fetches=fetches,
        fetch_types=tuple(types.get(n, onnx.TensorProto.UNDEFINED) for n in fetches),
        model_inputs=inputs,
    )


def model_with_outputs(
    model: onnx.ModelProto, names: Sequence[str], *, elem_types: Mapping[str, int] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names`` (existing outputs kept).

    ``elem_types`` (ONNX element types by name) saves a second shape inference when known.
    """
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    types = _elem_types(model) if elem_types is None else elem_types
    for name in names:
        if name in existing:
            continue
        elem_type = types.get(name, onnx.TensorProto.UNDEFINED)
        # The element type is all ONNX Runtime needs; the inferred shape is left out because an
        # exporter's static dims (a fixed batch of 1, say) would clash with the calibration batches.
        if elem_type == onnx.TensorProto.UNDEFINED:
            augmented.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        else:
            augmented.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return augmented


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor, after ONNX shape inference where it succeeds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
        # Inference is only a source of types; ONNX Runtime still infers them when loading.
        inferred = model
    graph = inferred.graph
    types: dict[str, int] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def _ort_errors() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.RuntimeException,
            state.NotImplemented, state.InvalidProtobuf, state.EPFail)  # fmt: skip


def _open_session(model: onnx.ModelProto, intra_op_threads: int | None) -> onnxruntime.InferenceSession:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Basic optimizations (constant folding, exact-math fusions) never remove a graph output, so
    # every requested tensor is still computed as written.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    if intra_op_threads is not None:
        if intra_op_threads < 1:
            raise BadInput(f"intra_op_threads must be at least 1, got {intra_op_threads}.")
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except _ort_errors() as exc:
        raise InvalidModel(f"ONNX Runtime cannot load the model for calibration: {exc}") from exc


class _PassRunner:
    """Runs one pass over the batches and hands each requested tensor to a fold function."""

    def __init__(
        self,
        plan: CollectionPlan,
        session: onnxruntime.InferenceSession,
        progress: ProgressCallback | None,
        should_stop: StopCheck | None,
        budget_bytes: int | None,
    ) -> None:
        self._plan = plan
        self._session = session
        self._progress = progress
        self._should_stop = should_stop
        self._budget_bytes = (
            budget_bytes  # None: the model's batch dimension is fixed, runs take whole batches
        )
        self._samples_per_run: int | None = None  # learned from the first run

    def run_pass(
        self,
        batches: BatchFactory,
        fold: Callable[[str, np.ndarray], None],
        *,
        done_before: int,
        total: int,
    ) -> int:
        """Fold every batch of one pass; returns the number of samples seen."""
        seen = 0
        for index, batch in enumerate(batches()):
            self._check_stop(done_before + seen, total)
            for feeds in self._runs_of(batch):
                arrays = self._run(index, feeds)
                count = _batch_size(feeds, self._plan.model_inputs)
                self._learn_run_size(arrays, count)
                for name, values in arrays.items():
                    fold(name, values)
                del arrays  # release this run's activations before the next one is computed
                seen += count
            if self._progress is not None:
                self._progress(done_before + seen, max(total, done_before + seen))
        self._check_stop(done_before + seen, total)
        return seen

    def _runs_of(self, batch: Mapping[str, np.ndarray]) -> Iterator[Mapping[str, np.ndarray]]:
        """The batch itself, or consecutive slices of it that fit the activation budget."""
        size = _batch_size(batch, self._plan.model_inputs)
        if self._budget_bytes is None or not self._plan.model_inputs or size <= 1:
            yield batch
            return
        start = 0
        while start < size:
            step = self._samples_per_run or 1
            yield {name: np.asarray(values)[start : start + step] for name, values in batch.items()}
            start += step

    def _learn_run_size(self, arrays: Mapping[str, np.ndarray], samples: int) -> None:
        if self._budget_bytes is None or self._samples_per_run is not None or samples < 1:
            return
        per_sample = sum(int(a.nbytes) for a in arrays.values()) / samples
        self._samples_per_run = max(1, int(self._budget_bytes // max(per_sample, 1.0)))

    def _run(self, index: int, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self._plan.model_inputs if n not in feeds]
        unexpected = [n for n in feeds if n not in self._plan.model_inputs]
        if missing or unexpected:
            raise InvalidCalibrationSet(
                f"Calibration batch {index} does not match the model's inputs "
                f"{list(self._plan.model_inputs)}: missing {missing}, unexpected {unexpected}."
            )
        arrays: dict[str, np.ndarray] = {name: np.asarray(feeds[name]) for name in self._plan.from_feeds}
        if self._plan.fetches:
            # ONNX Runtime raises ValueError/TypeError for feeds it cannot convert, its own for the rest.
            run_errors: tuple[type[BaseException], ...] = (*_ort_errors(), ValueError, TypeError)
            try:
                outputs: list[Any] = self._session.run(list(self._plan.fetches), dict(feeds))
            except run_errors as exc:
                raise InvalidCalibrationSet(
                    f"ONNX Runtime could not run calibration batch {index}: {exc}. Check the input "
                    "dtypes and shapes against the model."
                ) from exc
            arrays.update(zip(self._plan.fetches, (np.asarray(o) for o in outputs), strict=True))
        return arrays

    def _check_stop(self, done: int, total: int) -> None:
        if self._should_stop is not None and self._should_stop():
            of_total = f" of {total}" if total else ""
            raise JobCancelled(
                f"Calibration was cancelled after {done}{of_total} samples (both passes counted)."
            )


def _batch_size(feeds: Mapping[str, np.ndarray], input_names: Sequence[str]) -> int:
    first = np.asarray(feeds[input_names[0]]) if input_names else None
    if first is None or first.ndim == 0:
        return 1
    return int(first.shape[0])
