"""Per-layer FP32-vs-quantized deltas: the same intermediate tensors of two ONNX models, compared.

``layer_deltas(reference, candidate, batches)`` exposes every tensor that both graphs produce under
the same name (node outputs that are not graph outputs) as extra outputs, runs both models with ONNX
Runtime on the CPU over the same batches, and accumulates per tensor: cosine similarity, maximum
absolute error and signal-to-noise ratio (10·log10(Σref² / Σ(ref−cand)²), in dB, clamped to ±300 dB as
in :mod:`service.accuracy.outputs`) over all samples.
The worst tensors by SNR say where quantization error enters the network.

Matching by name is meaningful because the service's preparation steps keep tensor names: BN
folding gives the convolution the BatchNormalization's output name (the pre-BN tensor disappears
rather than changing meaning) and Q/DQ placement only adds ``*_quantized``/``*_dequantized`` tensors.
Memory is one batch's activations of both models at a time; accumulators are a few floats per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from service.accuracy.outputs import cpu_session_options, onnxruntime_session, snr_db
from service.calibration.collect import model_with_outputs
from service.onnx_graph.graph import GraphIndex

DEFAULT_WORST = 10


@dataclass(frozen=True)
class LayerDelta:
    """How far one intermediate tensor of the candidate is from the reference's."""

    tensor: str
    node: str
    op_type: str
    cosine: float
    max_abs_error: float
    snr_db: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "node": self.node,
            "op_type": self.op_type,
            "cosine": round(self.cosine, 6),
            "max_abs_error": float(f"{self.max_abs_error:.6g}"),
            "snr_db": round(self.snr_db, 3),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerDelta:
        return cls(
            tensor=data["tensor"],
            node=data["node"],
            op_type=data["op_type"],
            cosine=float(data["cosine"]),
            max_abs_error=float(data["max_abs_error"]),
            snr_db=float(data["snr_db"]),
        )


@dataclass(frozen=True)
class LayerDeltas:
    """The worst layers, or why per-layer deltas are not available for this engine."""

    available: bool
    note: str
    compared_tensors: int = 0
    samples: int = 0
    worst: tuple[LayerDelta, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "note": self.note,
            "compared_tensors": self.compared_tensors,
            "samples": self.samples,
            "worst": [delta.to_dict() for delta in self.worst],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerDeltas:
        return cls(
            available=bool(data["available"]),
            note=data.get("note", ""),
            compared_tensors=int(data.get("compared_tensors", 0)),
            samples=int(data.get("samples", 0)),
            worst=tuple(LayerDelta.from_dict(d) for d in data.get("worst", ())),
        )


class _TensorAccumulator:
    """Running sums for one tensor, in float64."""

    def __init__(self) -> None:
        self.ref_energy = 0.0
        self.cand_energy = 0.0
        self.dot = 0.0
        self.error_energy = 0.0
        self.max_abs = 0.0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = reference.astype(np.float64, copy=False).ravel()
        cand = candidate.astype(np.float64, copy=False).ravel()
        error = ref - cand
        self.ref_energy += float(ref @ ref)
        self.cand_energy += float(cand @ cand)
        self.dot += float(ref @ cand)
        self.error_energy += float(error @ error)
        if error.size:
            self.max_abs = max(self.max_abs, float(np.abs(error).max()))

    def delta(self, tensor: str, node: onnx.NodeProto) -> LayerDelta:
        norms = math.sqrt(self.ref_energy * self.cand_energy)
        cosine = self.dot / norms if norms > 0 else (1.0 if self.error_energy == 0 else 0.0)
        snr = snr_db(self.ref_energy, self.error_energy)
        return LayerDelta(tensor, node.name, node.op_type, cosine, self.max_abs, snr)


def shared_tensors(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> list[str]:
    """Node outputs both graphs produce, in the reference's order, graph outputs excluded."""
    outputs = {o.name for o in reference.graph.output} | {o.name for o in candidate.graph.output}
    produced = {name for node in candidate.graph.node for name in node.output if name}
    names = [name for node in reference.graph.node for name in node.output if name]
    return [name for name in dict.fromkeys(names) if name in produced and name not in outputs]


def layer_deltas(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    batches: Iterable[Mapping[str, np.ndarray]],
    *,
    worst: int = DEFAULT_WORST,
    note: str = "",
) -> LayerDeltas:
    """Compare every shared intermediate tensor over ``batches`` and keep the ``worst`` by SNR."""
    names = shared_tensors(reference, candidate)
    if not names:
        return LayerDeltas(
            available=False, note="The two graphs share no intermediate tensor names to compare."
        )
    ref_session = _session(model_with_outputs(reference, names))
    cand_session = _session(model_with_outputs(candidate, names))
    ref_inputs = [i.name for i in ref_session.get_inputs()]
    cand_inputs = {i.name: i for i in cand_session.get_inputs()}
    accumulators = {name: _TensorAccumulator() for name in names}
    samples = 0
    for batch in batches:
        ref_values = dict(zip(names, ref_session.run(names, {n: batch[n] for n in ref_inputs}), strict=True))
        cand_feeds = {n: np.asarray(batch[n], dtype=_np_type(arg.type)) for n, arg in cand_inputs.items()}
        cand_values = dict(zip(names, cand_session.run(names, cand_feeds), strict=True))
        for name in names:
            ref, cand = np.asarray(ref_values[name]), np.asarray(cand_values[name])
            if ref.dtype.kind == "f" and cand.dtype.kind == "f" and ref.shape == cand.shape:
                accumulators[name].update(ref, cand)
        samples += len(next(iter(batch.values())))
    reference_index = GraphIndex(reference.graph)
    compared: list[LayerDelta] = []
    for name, acc in accumulators.items():
        producer = reference_index.producer(name)
        if producer is not None and (acc.ref_energy or acc.cand_energy):  # names are node outputs
            compared.append(acc.delta(name, producer))
    compared.sort(key=lambda d: d.snr_db)
    return LayerDeltas(
        available=True,
        note=note,
        compared_tensors=len(compared),
        samples=samples,
        worst=tuple(compared[:worst]),
    )


def _np_type(ort_type: str) -> np.dtype:
    element = ort_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype({"float": "float32", "double": "float64"}.get(element, element))


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime

    options = cpu_session_options()
    # Basic optimizations never remove a graph output, so every exposed tensor is computed as written.
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return onnxruntime_session(model, options)
