"""How TensorRT 10's entropy calibrator is fed: batch size, dtypes and shapes taken from the network.

The calibrator hands TensorRT raw device memory, which TensorRT reads with the network's own input
types and shapes, so the host batches must be built to match them exactly:

- dtypes: each input's batch array has the network input's type (``trt.nptype``): an INT64 input
  gets int64 bytes, an FP16 input float16 ones, never float32 reinterpreted;
- batch size: a network input with a *static* leading dimension is read with exactly that many
  samples, so the calibration batch size becomes that dimension (the requested one is replaced and
  the build log says so); inputs whose static batch dimensions differ cannot be calibrated together;
- sample shapes: every static dimension must match the data (checked by ``CalibrationBatcher``);
- calibration profile: only *dynamic* inputs get one, fixed at the calibration batch shape; static
  inputs must not appear in a profile.

``calibration_plan`` is pure (tested without TensorRT); ``network_inputs`` reads a parsed network
(tested with TensorRT-RTX's parser on this CPU); ``calibrator_for`` wires both to the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from service.backends.base import BuildSpec
from service.backends.cuda_device import CudaDevice
from service.errors import BadInput, InvalidCalibrationSet


@dataclass(frozen=True)
class NetworkInput:
    """One input of a parsed network: numpy dtype and dims (-1 where dynamic)."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int, ...]

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.dims)


@dataclass(frozen=True)
class CalibrationPlan:
    """What the calibration batches must look like for this network."""

    batch_size: int
    input_names: tuple[str, ...]
    dtypes: Mapping[str, np.dtype[Any]]
    dims: Mapping[str, tuple[int, ...]]
    profiled: tuple[str, ...]  # the dynamic inputs, which get a calibration profile
    notes: tuple[str, ...] = ()


def network_inputs(trt: ModuleType, network: Any) -> tuple[NetworkInput, ...]:
    """The inputs of a parsed network, with numpy dtypes; BadInput for types numpy cannot hold."""
    inputs = []
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        try:
            dtype = np.dtype(trt.nptype(tensor.dtype))
        except TypeError as exc:
            raise BadInput(
                f"Input '{tensor.name}' has type {tensor.dtype}, which calibration data cannot be "
                "converted to; give the model float32, float16, int8, int32, int64 or bool inputs."
            ) from exc
        inputs.append(NetworkInput(tensor.name, dtype, tuple(int(d) for d in tensor.shape)))
    return tuple(inputs)


def calibration_plan(inputs: Sequence[NetworkInput], requested_batch: int) -> CalibrationPlan:
    """Batch size, dtypes and profiled inputs for calibrating a network with ``inputs``."""
    static_batches = {i.name: i.dims[0] for i in inputs if i.dims and i.dims[0] >= 0}
    notes: list[str] = []
    batch = requested_batch
    if len(set(static_batches.values())) > 1:
        raise BadInput(
            f"The network's inputs have different static batch dimensions {static_batches}; TensorRT's "
            "calibrator feeds one batch of samples to all inputs at once, so it cannot calibrate this "
            "network. Give the inputs one batch dimension, or calibrate with the service (Q/DQ)."
        )
    if static_batches:
        batch = next(iter(static_batches.values()))
        if batch != requested_batch:
            notes.append(
                f"calibration batch size {requested_batch} replaced by {batch}: inputs "
                f"{sorted(static_batches)} have a static batch dimension of {batch}"
            )
    return CalibrationPlan(
        batch_size=batch,
        input_names=tuple(i.name for i in inputs),
        dtypes={i.name: i.dtype for i in inputs},
        dims={i.name: i.dims for i in inputs},
        profiled=tuple(i.name for i in inputs if i.dynamic),
        notes=tuple(notes),
    )


def calibrator_for(
    trt: ModuleType,
    builder: Any,
    config: Any,
    network: Any,
    spec: BuildSpec,
    device: CudaDevice,
    notes: list[str],
    written: dict[str, bytes],
) -> Any:
    """Attach an entropy calibrator (and, for dynamic inputs, a calibration profile) to ``config``."""
    from service.backends.trt_calibrator import CalibrationBatcher, make_entropy_calibrator

    plan = calibration_plan(network_inputs(trt, network), spec.calibration_batch_size)
    notes.extend(plan.notes)
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]]
    if spec.calibration_batches is None:
        # Cache only: TensorRT reads the scales and never asks for a batch, so this batcher is never iterated.
        batches, samples = (lambda: iter(())), plan.batch_size
    else:
        batches = spec.calibration_batches
        samples = spec.calibration_samples or count_samples(batches, plan.input_names[0])
    batcher = CalibrationBatcher(
        batches,
        plan.input_names,
        batch_size=plan.batch_size,
        num_samples=samples,
        input_dtypes=plan.dtypes,
        input_shapes=plan.dims,
    )
    calibrator = make_entropy_calibrator(
        batcher,
        device=device,
        cache=spec.calibration_cache,
        on_cache_written=lambda data: written.__setitem__("cache", data),
    )
    config.int8_calibrator = calibrator
    if spec.calibration_batches is not None and plan.profiled:
        profile = builder.create_optimization_profile()
        shapes = batcher.batch_shapes()
        for name in plan.profiled:
            profile.set_shape(name, shapes[name], shapes[name], shapes[name])
        config.set_calibration_profile(profile)
    return calibrator


def count_samples(batches: Callable[[], Iterable[Mapping[str, np.ndarray]]], first_input: str) -> int:
    """Samples in one pass over ``batches`` (the leading dimension of ``first_input``, summed)."""
    total = 0
    for feeds in batches():
        if first_input not in feeds:
            raise InvalidCalibrationSet(
                f"A calibration batch lacks input '{first_input}'; it has {sorted(feeds)}."
            )
        total += int(np.shape(feeds[first_input])[0])
    return total
