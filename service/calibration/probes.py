"""In-graph probes: what calibration fetches from each activation instead of the whole tensor.

Fetching every calibrated activation whole costs more than computing it: a 640x640 text detector
hands back ~288 MB per sample (72 M float32 values over 132 tensors), and copying and binning them
took longer than the inference. ``model_with_probes`` adds, for each tensor T, small nodes that run
inside ONNX Runtime and whose outputs are all calibration fetches:

* ``max``, ``min``: ReduceMax and ReduceMin over all of T. The histogram's ``observed_max`` (and the
  ``max`` method's threshold) stays exact although only a subsample is counted.
* ``sum``: ReduceSum over all of T. ONNX Runtime's ReduceMax/ReduceMin skip NaN (measured on 1.32);
  a sum does not, so a NaN anywhere in T is still reported.
* ``sample``: T flattened per sample to ``[N, size]`` (Flatten, axis 1) and sliced along axis 1 with
  step ``s``: every s-th value of each sample. ``s`` is computed in the graph from T's runtime shape,
  ``s = max(floor(size / sample_elements), 1)`` made odd by rounding down, so each sample contributes
  at least ``sample_elements`` values, tensors up to that size are fetched whole (small test models
  keep exact histograms), and dynamic shapes need no first run to learn sizes. The step depends on
  the per-sample size only, never on N, so a sample contributes the same values in any batch and the
  histograms stay independent of batch size and order. An odd step is coprime with the factors of 2
  that stride-2 convolutions, 2x upsampling and power-of-two widths put into activation layouts, so
  the sample walks through every column parity and channel instead of a fixed phase of a pattern.

Assumption: axis 0 is the batch axis (true of CNN activations). For a tensor where it is not, the
sample is still deterministic for a given batching, but may differ between batchings.

Tensors of a type other than float32 are cast to float32 first (the reductions then run on float32
kernels everywhere). Opsets before 10 have no Slice with steps: there the sample is the whole tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import TensorProto, helper

# Values each sample contributes per tensor (at least): with 48 samples, ~12.6 M values per
# histogram, so even the 99.99th percentile rests on ~1,260 values above it.
DEFAULT_SAMPLE_ELEMENTS = 1 << 18
# Slice with a step input exists from opset 10 on.
_STRIDED_SLICE_OPSET = 10
_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class TensorProbe:
    """The output names that carry one tensor's exact extremes, its sum and its subsample.

    ``size`` (int64 ``[1]``, values per sample of the whole tensor) is absent before opset 10,
    where the sample is the whole tensor.
    """

    tensor: str
    maximum: str
    minimum: str
    total: str
    sample: str
    size: str | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        floats = (self.maximum, self.minimum, self.total, self.sample)
        return floats if self.size is None else (*floats, self.size)


def model_with_probes(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    elem_types: Mapping[str, int],
    *,
    sample_elements: int = DEFAULT_SAMPLE_ELEMENTS,
) -> tuple[onnx.ModelProto, tuple[TensorProbe, ...]]:
    """A copy of ``model`` with a probe per tensor (module docstring); the caller's model is untouched.

    ``elem_types`` maps tensor names to ONNX element types (missing: unknown, cast to float32).
    """
    if sample_elements < 1:
        raise ValueError(f"sample_elements must be at least 1, got {sample_elements}.")
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    opset = next((o.version for o in probed.opset_import if o.domain in ("", "ai.onnx")), 1)
    builder = _ProbeBuilder(probed.graph, _free_prefix(probed.graph), opset)
    strided = opset >= _STRIDED_SLICE_OPSET
    if strided:
        builder.shared_constants(sample_elements)
    probes = tuple(
        builder.probe(index, name, elem_types.get(name, TensorProto.UNDEFINED), strided=strided)
        for index, name in enumerate(tensors)
    )
    for probe in probes:
        for output in probe.outputs:
            elem_type = TensorProto.INT64 if output == probe.size else TensorProto.FLOAT
            probed.graph.output.append(helper.make_tensor_value_info(output, elem_type, None))
    return probed, probes


class _ProbeBuilder:
    """Appends probe nodes to a graph under a prefix no existing name uses."""

    def __init__(self, graph: onnx.GraphProto, prefix: str, opset: int) -> None:
        self._graph = graph
        self._prefix = prefix
        self._opset = opset

    def _node(self, op_type: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self._graph.node.append(
            helper.make_node(op_type, inputs, [output], name=f"{output}_node", **attributes)
        )
        return output

    def _constant(self, name: str, tensor: onnx.TensorProto) -> str:
        return self._node("Constant", [], f"{self._prefix}{name}", value=tensor)

    def shared_constants(self, sample_elements: int) -> None:
        def ints(name: str, values: list[int]) -> None:
            self._constant(name, helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

        def floats(name: str, value: float) -> None:
            self._constant(name, helper.make_tensor(name, TensorProto.FLOAT, [1], [value]))

        ints("zero", [0])
        ints("one", [1])
        ints("two", [2])
        ints("end", [_INT64_MAX])
        floats("target", float(sample_elements))
        floats("fone", 1.0)
        floats("ftwo", 2.0)

    def probe(self, index: int, tensor: str, elem_type: int, *, strided: bool) -> TensorProbe:
        p = f"{self._prefix}{index}_"
        c = self._prefix
        source = tensor
        if elem_type != TensorProto.FLOAT:
            cast_to: object = TensorProto.FLOAT if self._opset >= 6 else "FLOAT"
            source = self._node("Cast", [tensor], f"{p}float", to=cast_to)
        maximum = self._node("ReduceMax", [source], f"{p}max", keepdims=0)
        minimum = self._node("ReduceMin", [source], f"{p}min", keepdims=0)
        total = self._node("ReduceSum", [source], f"{p}sum", keepdims=0)
        flat = self._node("Flatten", [source], f"{p}flat" if strided else f"{p}sample", axis=1)
        if not strided:
            return TensorProbe(tensor, maximum, minimum, total, flat)
        # Per-sample size -> step = odd_down(max(floor(size / target), 1)), in float32 arithmetic
        # (Max and Floor have no integer kernels before opset 12).
        shape = self._node("Shape", [flat], f"{p}shape")
        size = self._node("Slice", [shape, f"{c}one", f"{c}two"], f"{p}size")
        ratio = self._node(
            "Div", [self._node("Cast", [size], f"{p}fsize", to=TensorProto.FLOAT), f"{c}target"], f"{p}ratio"
        )
        step = self._node("Max", [self._node("Floor", [ratio], f"{p}floor"), f"{c}fone"], f"{p}step")
        less = self._node("Sub", [step, f"{c}fone"], f"{p}less")
        half = self._node("Floor", [self._node("Div", [less, f"{c}ftwo"], f"{p}halved")], f"{p}half")
        odd = self._node("Add", [self._node("Mul", [half, f"{c}ftwo"], f"{p}even"), f"{c}fone"], f"{p}odd")
        steps = self._node("Cast", [odd], f"{p}steps", to=TensorProto.INT64)
        sample = self._node("Slice", [flat, f"{c}zero", f"{c}end", f"{c}one", steps], f"{p}sample")
        return TensorProbe(tensor, maximum, minimum, total, sample, size)


def _free_prefix(graph: onnx.GraphProto) -> str:
    """A name prefix that no tensor or node of ``graph`` starts with."""
    names = {n for node in graph.node for n in (*node.input, *node.output, node.name)}
    names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer)}
    prefix = "calib_probe_"
    while any(name.startswith(prefix) for name in names):
        prefix = "_" + prefix
    return prefix
