"""Per-layer INT8 error of candidate activation thresholds, measured in one ONNX Runtime run per sample.

Contract: :func:`probe_layer_errors` takes a model prepared for a placement (its weighted layers named
as the placement names them), the layers the placement quantizes, and for each layer's activation
input a few candidate amax values (one per calibration method). It returns, per layer, the squared
error that each candidate causes **in that layer's output** (input quantized at the candidate, weight
quantized as the placement quantizes it) and the output's energy, summed over the probe samples.

How: one probe model holds the FP32 graph plus, for every (layer, candidate), a copy of the layer fed
``DequantizeLinear(QuantizeLinear(x))`` and the quantized weight, followed by
``ReduceSumSquare(copy - original)``. Only those scalars are fetched, so memory is one forward pass
plus one layer copy at a time, and the cost is about (1 + candidates) times the model's weighted-layer
compute per sample.

Why the consuming layer's output rather than the tensor itself: the threshold that minimises a
tensor's own quantization error (``mse``) ignores how the next layer weighs the clipped outliers
against the rounding noise; measuring the error where it lands picks, per tensor, the method that
hurts the network least. Neither TensorRT's calibrators, ONNX Runtime's nor Polygraphy's do this.
The same numbers rank layers by their own INT8 error (``relative_error``), which orders the layers
the accuracy search keeps in float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.accuracy.outputs import cpu_session_options, onnxruntime_session
from service.errors import JobCancelled
from service.onnx_graph.graph import GraphIndex
from service.quantize.encoding import quantize_weight
from service.quantize.rewrite import NameAllocator, WeightedLayer
from service.quantize.targets import QdqPlacement

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class LayerProbe:
    """One layer's output error for each candidate amax of its input, and its output energy."""

    node: str
    input: str
    candidates: tuple[float, ...]
    errors: tuple[float, ...]  # sum of squared output error per candidate
    energy: float  # sum of squared FP32 output

    def relative_errors(self) -> tuple[float, ...]:
        return tuple(
            e / self.energy if self.energy > 0 else (0.0 if e == 0 else float("inf")) for e in self.errors
        )


@dataclass(frozen=True)
class ProbeEncoding:
    """How the placement encodes activations and weights: its strategy, and the tensors it treats as >= 0."""

    placement: QdqPlacement
    non_negative: frozenset[str] = frozenset()


def probe_layer_errors(
    prepared: onnx.ModelProto,
    layers: Sequence[WeightedLayer],
    candidates: Mapping[str, Sequence[float]],
    batches: Batches,
    encoding: ProbeEncoding,
    *,
    max_samples: int = 4,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, LayerProbe]:
    """The :class:`LayerProbe` of every layer in ``layers`` whose input has candidates."""
    probe, fetches = _probe_model(prepared, layers, candidates, encoding)
    if not fetches:
        return {}
    session = onnxruntime_session(probe, cpu_session_options())
    del probe
    names = [name for _, _, name in fetches]
    sums = np.zeros(len(names), dtype=np.float64)
    seen = 0
    for batch in batches():
        size = int(np.asarray(next(iter(batch.values()))).shape[0]) if batch else 1
        for start in range(size):
            if seen >= max_samples:
                break
            if should_stop is not None and should_stop():
                raise JobCancelled("cancelled while probing layer errors")
            feeds = {name: np.asarray(value)[start : start + 1] for name, value in batch.items()}
            sums += np.array([float(v) for v in session.run(names, feeds)], dtype=np.float64)
            seen += 1
        if seen >= max_samples:
            break
    result: dict[str, LayerProbe] = {}
    by_layer: dict[str, dict[int, float]] = {}
    for (node, slot, _), total in zip(fetches, sums, strict=True):
        by_layer.setdefault(node, {})[slot] = float(total)
    index = GraphIndex(prepared.graph)
    for layer in layers:
        values = by_layer.get(layer.node)
        if values is None:
            continue
        x = index.node(layer.node).input[0]
        result[layer.node] = LayerProbe(
            node=layer.node,
            input=x,
            candidates=tuple(candidates[x]),
            errors=tuple(values[i] for i in range(len(candidates[x]))),
            energy=values[-1],
        )
    return result


def _probe_model(
    prepared: onnx.ModelProto,
    layers: Sequence[WeightedLayer],
    candidates: Mapping[str, Sequence[float]],
    encoding: ProbeEncoding,
) -> tuple[onnx.ModelProto, list[tuple[str, int, str]]]:
    """The probe model and its fetches: (layer, candidate slot or -1 for the energy, output name)."""
    model = onnx.ModelProto()
    model.CopyFrom(prepared)
    graph = model.graph
    index = GraphIndex(graph)
    names = NameAllocator(graph)
    fetches: list[tuple[str, int, str]] = []
    new_nodes: list[onnx.NodeProto] = []
    for layer in layers:
        node = index.node(layer.node)
        x, reference = node.input[0], node.output[0]
        if x not in candidates or not candidates[x]:
            continue
        weight = _dequantized_weight(
            index.weight_value(layer.weight), layer.axis, encoding.placement.weight_max
        )
        weight_name = names.fresh(f"{layer.weight}_probe")
        graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        for slot, amax in enumerate(candidates[x]):
            scale, zero = _activation_params(x, amax, encoding)
            scale_name, zero_name = names.fresh(f"{x}_probe_scale"), names.fresh(f"{x}_probe_zero")
            graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name))
            graph.initializer.append(numpy_helper.from_array(zero, zero_name))
            q, dq, y, diff, err = (
                names.fresh(f"{layer.node}_probe{slot}_{part}") for part in ["q", "dq", "y", "d", "e"]
            )
            new_nodes += [
                helper.make_node("QuantizeLinear", [x, scale_name, zero_name], [q], name=q),
                helper.make_node("DequantizeLinear", [q, scale_name, zero_name], [dq], name=dq),
                _layer_copy(node, [dq, weight_name, *node.input[2:]], y),
                helper.make_node("Sub", [y, reference], [diff], name=diff),
                helper.make_node("ReduceSumSquare", [diff], [err], name=err, keepdims=0),
            ]
            fetches.append((layer.node, slot, err))
        energy = names.fresh(f"{layer.node}_probe_energy")
        new_nodes.append(helper.make_node("ReduceSumSquare", [reference], [energy], name=energy, keepdims=0))
        fetches.append((layer.node, -1, energy))
    graph.node.extend(new_nodes)
    del graph.output[:]
    graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for _, _, name in fetches
    )
    return model, fetches


def _layer_copy(node: onnx.NodeProto, inputs: list[str], output: str) -> onnx.NodeProto:
    copy = helper.make_node(node.op_type, inputs, [output], name=output, domain=node.domain)
    copy.attribute.extend(node.attribute)
    return copy


def _dequantized_weight(weight: np.ndarray, axis: int | None, weight_max: int) -> np.ndarray:
    values, scale = quantize_weight(weight, axis, qmax=weight_max)
    shape = [-1 if a == axis else 1 for a in range(weight.ndim)] if axis is not None else []
    return (values.astype(np.float32) * scale.astype(np.float32).reshape(shape)).astype(np.float32)


def _activation_params(tensor: str, amax: float, encoding: ProbeEncoding) -> tuple[float, np.ndarray]:
    return encoding.placement.activation_params(tensor, amax, non_negative=tensor in encoding.non_negative)
