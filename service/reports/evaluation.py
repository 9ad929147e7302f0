"""Accuracy of an engine against its FP32 reference on a held-out set, with per-layer deltas where possible.

``evaluate_engine`` runs the engine's runner and the FP32 reference model (ONNX Runtime, CPU) on the
same batches of a stored calibration set and accumulates per-output cosine similarity, maximum
absolute error, SNR and, for class-score outputs, top-1 agreement (:mod:`service.accuracy.outputs`).

The reference (:func:`reference_model_for`):

* an engine built from an FP32 model is compared with that model;
* an engine built from a Q/DQ model the service produced (a quantization job's output) is compared
  with the FP32 model it was quantized from (its ``parent_id`` chain);
* an engine built from an uploaded Q/DQ model (quantization-aware training) has no FP32 twin in the
  catalog, so the reference is that model with every QuantizeLinear→DequantizeLinear pair removed,
  run in FP32: activations stay float, weights stored as float keep their values, and weights stored
  as int8 keep their dequantized values. The report states this: it measures activation
  quantization and the backend, not the rounding of int8-stored weights.

Per-layer deltas (:mod:`service.reports.layer_deltas`) need intermediate tensors. For ``onnxruntime``
engines they come from the engine's built ONNX (what the backend was handed; the engine itself is the
optimized graph with fused nodes) run beside the reference. TensorRT engines fuse layers and do not
expose intermediate tensors; marking them as outputs would mean another build with other fusions,
which would no longer be the engine being evaluated, so the report says deltas are not available.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from service.accuracy.outputs import AccuracyAccumulator, onnxruntime_session, run_session
from service.backends.base import IOSpec, Runner
from service.catalog.engines import EngineRecord
from service.catalog.models import ModelCatalog
from service.errors import BadInput, JobCancelled
from service.onnx_graph.graph import GraphIndex
from service.reports.benchmark import MeasuredEngine
from service.reports.layer_deltas import LayerDeltas, layer_deltas
from service.serving.validation import validate_feeds
from service.store.clock import utc_now

EVALUATION_KIND = "evaluation"
DEFAULT_EVAL_BATCH = 8
DEFAULT_LAYER_SAMPLES = 16
NO_LAYERS_TENSORRT = (
    "Per-layer deltas are not available for {backend} engines: TensorRT fuses layers and does not expose "
    "intermediate tensors, and marking them as outputs would need another build with other fusions, "
    "which would no longer be this engine. Build an onnxruntime engine of the same model to see them."
)
LAYERS_ORT_NOTE = (
    "Intermediate tensors of the engine's built ONNX (the model handed to ONNX Runtime, before its own "
    "CPU fusions) against the same tensors of the reference, both run by ONNX Runtime on the CPU, over "
    "the first {samples} sample(s)."
)

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class ReferenceModel:
    model: onnx.ModelProto
    model_id: str
    description: str


def reference_model_for(record: EngineRecord, models: ModelCatalog) -> ReferenceModel:
    """The FP32 model an engine's outputs are judged against (see the module docstring)."""
    current = models.get(record.model_id)
    if not current.info.quantization.explicit:
        return ReferenceModel(models.load(current.id), current.id, "the FP32 model the engine was built from")
    seen = {current.id}
    while current.parent_id is not None and current.parent_id not in seen:
        current = models.get(current.parent_id)
        seen.add(current.id)
        if not current.info.quantization.explicit:
            return ReferenceModel(
                models.load(current.id),
                current.id,
                f"the FP32 model {current.id[:12]} that the engine's Q/DQ model {record.model_id[:12]} was "
                "quantized from",
            )
    return ReferenceModel(
        model_without_qdq_pairs(models.load(record.model_id)),
        record.model_id,
        "the uploaded Q/DQ model with every QuantizeLinear->DequantizeLinear pair removed, run in FP32 "
        "(weights stored as int8 keep their dequantized values); no FP32 original is in the catalog",
    )


def model_without_qdq_pairs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which each DequantizeLinear fed by a QuantizeLinear reads its float input."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph_index = GraphIndex(graph)  # read before the rewrite below, which only re-wires slots
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    bridges: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = graph_index.producer(node.input[0])
        if source is None or source.op_type != "QuantizeLinear":
            continue
        dropped.add(id(node))
        if node.output[0] in graph_outputs:  # keep the output's name: bridge it with an Identity
            bridges.append(onnx.helper.make_node("Identity", [source.input[0]], [node.output[0]]))
        else:
            rename[node.output[0]] = source.input[0]
    kept = [node for node in graph.node if id(node) not in dropped]
    for node in kept:
        for index, name in enumerate(node.input):
            if name in rename:
                node.input[index] = rename[name]
    used = {name for node in kept + bridges for name in node.input} | graph_outputs
    kept = [n for n in kept if n.op_type != "QuantizeLinear" or any(out in used for out in n.output)]
    del graph.node[:]
    graph.node.extend(kept + bridges)
    return result


@dataclass(frozen=True)
class EvaluationReport:
    engine: MeasuredEngine
    reference_model_id: str
    reference: str
    eval_set_id: str
    samples: int
    batch_size: int
    accuracy: dict[str, Any]
    layers: LayerDeltas
    measured_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": EVALUATION_KIND,
            "summary": self.engine.measured_on,
            "engine": self.engine.to_dict(),
            "reference": {
                "model_id": self.reference_model_id,
                "description": self.reference,
                "run_with": "onnxruntime (CPU)",
            },
            "eval_set_id": self.eval_set_id,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "accuracy": self.accuracy,
            "layer_deltas": self.layers.to_dict(),
            "measured_at": self.measured_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        return cls(
            engine=MeasuredEngine.from_dict(data["engine"]),
            reference_model_id=data["reference"]["model_id"],
            reference=data["reference"]["description"],
            eval_set_id=data["eval_set_id"],
            samples=int(data["samples"]),
            batch_size=int(data["batch_size"]),
            accuracy=dict(data["accuracy"]),
            layers=LayerDeltas.from_dict(data["layer_deltas"]),
            measured_at=data["measured_at"],
        )


def evaluation_batch_size(inputs: Iterable[IOSpec], preferred: int = DEFAULT_EVAL_BATCH) -> tuple[int, bool]:
    """(batch size, whether a shorter last batch is allowed) for a runner's inputs."""
    size, partial = preferred, True
    for spec in inputs:
        first = spec.shape[0] if spec.shape else 1
        if isinstance(first, int) and first >= 0:
            return first, False
        if spec.profile is not None:
            size = min(size, spec.profile.max[0])
            partial = partial and spec.profile.min[0] <= 1
    return size, partial


def usable_samples(available: int, batch_size: int, partial: bool) -> int:
    usable = available if partial else (available // batch_size) * batch_size
    if usable == 0:
        raise BadInput(
            f"The evaluation set has {available} sample(s), fewer than one batch of {batch_size} that this "
            "engine takes; upload more samples."
        )
    return usable


@dataclass(frozen=True)
class EvaluationData:
    """A stored set to evaluate on: ``batches(batch_size, stop)`` yields samples ``0:stop`` by input name."""

    set_id: str
    samples: int
    batches: Callable[[int, int], Iterable[Mapping[str, np.ndarray]]]


def evaluate_engine(
    runner: Runner,
    measured: MeasuredEngine,
    reference: ReferenceModel,
    data: EvaluationData,
    *,
    max_samples: int | None = None,
    built_model: onnx.ModelProto | None = None,
    progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EvaluationReport:
    """Compare ``runner`` with ``reference`` on ``data``; add per-layer deltas when ``built_model`` is given.

    ``built_model`` is the engine's built ONNX for onnxruntime engines, None for backends whose
    intermediate tensors cannot be observed.
    """
    batch_size, partial = evaluation_batch_size(runner.inputs)
    limit = min(data.samples, max_samples) if max_samples else data.samples
    total = usable_samples(limit, batch_size, partial)
    session = onnxruntime_session(reference.model)
    output_names = [o.name for o in session.get_outputs()]
    accumulator = AccuracyAccumulator()
    done = 0
    for batch in data.batches(batch_size, total):
        if should_stop is not None and should_stop():
            raise JobCancelled("The evaluation was stopped before it finished.")
        expected = run_session(session, output_names, batch)
        got = runner.infer(validate_feeds(batch, runner.inputs, allow_safe_casts=True))
        accumulator.update(expected, {name: np.asarray(value) for name, value in got.items()})
        done += len(next(iter(batch.values())))
        if progress is not None:
            progress(0.8 * done / total)
    accuracy = accumulator.finish().to_dict()
    if built_model is None:
        layers = LayerDeltas(available=False, note=NO_LAYERS_TENSORRT.format(backend=measured.backend))
    else:
        layer_total = usable_samples(min(total, DEFAULT_LAYER_SAMPLES), batch_size, partial)
        layers = layer_deltas(
            reference.model,
            built_model,
            data.batches(batch_size, layer_total),
            note=LAYERS_ORT_NOTE.format(samples=layer_total),
        )
    if progress is not None:
        progress(1.0)
    return EvaluationReport(
        engine=measured,
        reference_model_id=reference.model_id,
        reference=reference.description,
        eval_set_id=data.set_id,
        samples=done,
        batch_size=batch_size,
        accuracy=accuracy,
        layers=layers,
        measured_at=utc_now(),
    )
