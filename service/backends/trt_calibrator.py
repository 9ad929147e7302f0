"""TensorRT 10 ``IInt8EntropyCalibrator2`` adapter: fixed-size batches into GPU device buffers.

Four parts; all but the last are tested without a GPU (the device through a recording double):

``CalibrationBatcher``
    Re-batches the calibration data (any incoming batch sizes) into batches of exactly
    ``batch_size`` samples: one C-contiguous array per engine input, in the engine's input order,
    float32 unless ``input_dtypes`` gives the engine's type for an input (TensorRT reads raw bytes
    in its own layout). Feeds the engine does not take (labels, say) are ignored. The last partial
    batch is *dropped*, never padded: padding with zeros or repeated samples would put values into
    TensorRT's histograms that are not in the data (zeros drag an entropy threshold down), while
    dropping loses fewer than ``batch_size`` samples. Fewer samples than one batch is an error.
    Each ``iter()`` starts a fresh pass, as the builder may ask twice.
``CalibratorState``
    What the TensorRT callbacks do, minus the device copies: serve the next batch in the order of
    the names TensorRT asks for, hand out the cache we were given (re-headed for the TensorRT that
    reads it, which rejects a cache from another version), pass written caches to a callback, and
    record the first failure. TensorRT calls these methods from C++ and cannot carry a Python
    exception through, so a failure ends calibration (``get_batch`` returns None) and
    ``raise_failure()`` re-raises it after the build.
``DeviceBatchFeeder``
    Copies each host batch into device buffers allocated once per input, through a
    :class:`service.backends.cuda_device.CudaDevice`, with the primary context pushed per call.
``make_entropy_calibrator``
    Imports tensorrt and returns the ``trt.IInt8EntropyCalibrator2`` subclass instance whose
    callbacks delegate to the two above (a few lines, checked by reading).

With TensorRT 10 every network has an explicit batch dimension: the batch is the leading dimension
of each array (it must match the network's static input shape or the calibration profile), and
``get_batch_size`` returns 1, as TensorRT expects for explicit-batch networks (a larger value is
taken as an extra implicit batch factor and triggers "Explicit batch network detected and batch
size specified").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike

from service.calibration.trt_cache import (
    DEFAULT_ALGORITHM,
    calibration_cache_from_scales,
    scales_from_calibration_cache,
)
from service.errors import BadInput, InvalidCalibrationSet, JobCancelled

if TYPE_CHECKING:
    import tensorrt as trt

    from service.backends.cuda_device import CudaDevice

logger = logging.getLogger(__name__)

# Same shapes as in service.calibration.collect: a factory that starts a fresh pass per call.
BatchFactory = Callable[[], Iterable[Mapping[str, np.ndarray]]]
StopCheck = Callable[[], bool]
CacheCallback = Callable[[bytes], None]


@dataclass(frozen=True, eq=False)
class HostBatch:
    """One calibration batch: a C-contiguous array per engine input (float32 by default), in engine order."""

    index: int
    input_names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]

    def arrays_for(self, names: Sequence[str]) -> list[np.ndarray]:
        """The arrays in the order of ``names`` (the order TensorRT asks in)."""
        by_name = dict(zip(self.input_names, self.arrays, strict=True))
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise InvalidCalibrationSet(
                f"TensorRT asked for calibration inputs {unknown}, which the calibration data does not "
                f"provide (it has {list(self.input_names)})."
            )
        return [by_name[n] for n in names]


class CalibrationBatcher:
    """Fixed-size batches, float32 unless ``input_dtypes`` says otherwise; a partial last batch is dropped."""

    def __init__(
        self,
        batches: BatchFactory,
        input_names: Sequence[str],
        *,
        batch_size: int,
        num_samples: int,
        input_dtypes: Mapping[str, DTypeLike] | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        should_stop: StopCheck | None = None,
    ) -> None:
        if batch_size < 1:
            raise BadInput(f"The calibration batch size must be at least 1, got {batch_size}.")
        if not input_names or len(set(input_names)) != len(input_names):
            raise BadInput(f"The engine input names must be non-empty and distinct, got {list(input_names)}.")
        if num_samples < batch_size:
            raise InvalidCalibrationSet(
                f"The calibration set has {num_samples} samples, fewer than one batch of {batch_size}; "
                "upload more samples or choose a smaller calibration batch size."
            )
        self._batches = batches
        self.input_names = tuple(input_names)
        dtypes = dict(input_dtypes or {})
        unknown = sorted(set(dtypes) - set(self.input_names))
        if unknown:
            raise BadInput(
                f"input_dtypes names {unknown}, which are not engine inputs {list(self.input_names)}."
            )
        self.input_dtypes = tuple(np.dtype(dtypes.get(name, np.float32)) for name in self.input_names)
        # The network's dims per input (-1 where dynamic): every static dim must match the data's.
        self.input_shapes = {name: tuple(int(d) for d in dims) for name, dims in (input_shapes or {}).items()}
        self.batch_size = batch_size
        self.num_samples = num_samples
        self._should_stop = should_stop

    @property
    def num_batches(self) -> int:
        return self.num_samples // self.batch_size

    @property
    def dropped_samples(self) -> int:
        return self.num_samples - self.num_batches * self.batch_size

    def batch_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each input's batch array, read from the first batch (for calibration profiles)."""
        first = next(iter(self))
        return {name: tuple(array.shape) for name, array in zip(first.input_names, first.arrays, strict=True)}

    def __iter__(self) -> Iterator[HostBatch]:
        builder = _BatchBuilder(self.input_names, self.input_dtypes, self.batch_size)
        produced = 0
        for index, feeds in enumerate(self._batches()):
            arrays, count = self._checked(index, feeds)
            offset = 0
            while offset < count and produced < self.num_batches:
                offset += builder.fill(arrays, offset, count - offset)
                if builder.full:
                    if self._should_stop is not None and self._should_stop():
                        raise JobCancelled(
                            f"Calibration was cancelled after {produced} of {self.num_batches} batches."
                        )
                    yield HostBatch(produced, self.input_names, builder.take())
                    produced += 1
            if produced == self.num_batches:
                return
        raise InvalidCalibrationSet(
            f"The calibration data yielded {produced * self.batch_size + builder.filled} samples, fewer "
            f"than the {self.num_samples} it declared; it must yield the same samples on every pass."
        )

    def _checked(self, index: int, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InvalidCalibrationSet(
                f"Calibration batch {index} lacks the engine inputs {missing}; it has {sorted(feeds)}."
            )
        arrays = {name: np.asarray(feeds[name]) for name in self.input_names}
        counts = {name: (a.shape[0] if a.ndim else -1) for name, a in arrays.items()}
        if len(set(counts.values())) != 1 or -1 in counts.values():
            raise InvalidCalibrationSet(
                f"Calibration batch {index} has inputs with different or missing batch dimensions: {counts}."
            )
        for name, array in arrays.items():
            dims = self.input_shapes.get(name)
            if dims is not None and not _sample_fits(array.shape[1:], dims[1:]):
                raise InvalidCalibrationSet(
                    f"Calibration input '{name}' has samples of shape {list(array.shape[1:])}, but the "
                    f"network's input is {list(dims)} (-1 = any); TensorRT would read the wrong number of "
                    "bytes."
                )
            if array.dtype.kind not in "fiub":
                raise InvalidCalibrationSet(
                    f"Calibration input '{name}' has dtype {array.dtype}; numeric data is required."
                )
        return arrays, next(iter(counts.values()))


def _sample_fits(sample: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(sample) == len(dims) and all(d < 0 or d == s for s, d in zip(sample, dims, strict=True))


class _BatchBuilder:
    """Fills fresh (batch_size, *sample_shape) buffers of the engine's dtypes from incoming arrays."""

    def __init__(
        self, input_names: tuple[str, ...], dtypes: tuple[np.dtype[Any], ...], batch_size: int
    ) -> None:
        self._names = input_names
        self._dtypes = dict(zip(input_names, dtypes, strict=True))
        self._batch_size = batch_size
        self._sample_shapes: dict[str, tuple[int, ...]] = {}
        self._buffers: dict[str, np.ndarray] = {}
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == self._batch_size

    def fill(self, arrays: Mapping[str, np.ndarray], offset: int, available: int) -> int:
        take = min(available, self._batch_size - self.filled)
        for name in self._names:
            source = arrays[name]
            expected = self._sample_shapes.setdefault(name, tuple(source.shape[1:]))
            if tuple(source.shape[1:]) != expected:
                raise InvalidCalibrationSet(
                    f"Calibration input '{name}' changes its sample shape from {expected} to "
                    f"{tuple(source.shape[1:])}; every sample must have the same shape."
                )
            if name not in self._buffers:
                self._buffers[name] = np.empty((self._batch_size, *expected), dtype=self._dtypes[name])
            self._buffers[name][self.filled : self.filled + take] = source[offset : offset + take]
        self.filled += take
        return take

    def take(self) -> tuple[np.ndarray, ...]:
        arrays = tuple(self._buffers[name] for name in self._names)
        self._buffers = {}  # the next batch gets fresh arrays: a yielded batch is never overwritten
        self.filled = 0
        return arrays


class CalibratorState:
    """The GPU-independent behaviour of the TensorRT calibrator callbacks."""

    def __init__(
        self,
        batcher: CalibrationBatcher,
        *,
        cache: bytes | None = None,
        on_cache_written: CacheCallback | None = None,
        trt_version: str | None = None,
    ) -> None:
        self.batcher = batcher
        self._cache = _cache_for(cache, trt_version) if cache else None
        self._on_cache_written = on_cache_written
        self._iterator: Iterator[HostBatch] | None = None
        self.batches_served = 0
        self.cache_reads = 0
        self.written_cache: bytes | None = None
        self.failure: BaseException | None = None

    def next_arrays(self, names: Sequence[str]) -> list[np.ndarray] | None:
        """Host arrays of the next batch in the order of ``names``; None at the end or on failure."""
        if self.failure is not None:
            return None
        if self._iterator is None:
            self._iterator = iter(self.batcher)
        try:
            batch = next(self._iterator)
            arrays = batch.arrays_for(names)
        except StopIteration:
            self._iterator = None  # a later calibration run starts a fresh pass
            return None
        except Exception as exc:  # TensorRT cannot propagate it from its C++ caller: keep it
            self.record_failure(exc)
            return None
        self.batches_served += 1
        return arrays

    def read_cache(self) -> bytes | None:
        """The cache to hand TensorRT (it then skips calibration), or None to calibrate."""
        self.cache_reads += 1
        return self._cache

    def write_cache(self, data: Any) -> None:
        """Keep the cache TensorRT wrote and pass it on; a failing callback is recorded."""
        self.written_cache = bytes(memoryview(data))
        if self._on_cache_written is None:
            return
        try:
            self._on_cache_written(self.written_cache)
        except Exception as exc:  # raised later by raise_failure, not into TensorRT's C++ frame
            self.record_failure(exc)

    def record_failure(self, exc: BaseException) -> None:
        if self.failure is None:
            logger.error("INT8 calibration stopped: %s", exc)
            self.failure = exc

    def raise_failure(self) -> None:
        """Re-raise the first failure seen inside a callback, if any."""
        if self.failure is not None:
            raise self.failure


class DeviceBatchFeeder:
    """What ``get_batch`` and ``free`` do on the GPU, through a :class:`CudaDevice`.

    One device buffer per input, allocated at the first batch with that batch's byte size (the
    engine's dtype and the calibration batch shape, so an INT64 input gets 8 bytes per element) and
    reused; a batch of another size is a failure, never a copy past the buffer. Every device call
    runs with the device's primary context pushed and popped around it; nothing is retained or
    released here (the process owns the context).
    """

    def __init__(self, state: CalibratorState, device: CudaDevice) -> None:
        self.state = state
        self._device = device
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, nbytes)

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        """Device pointers of the next batch in the order of ``names``; None at the end or on failure."""
        arrays = self.state.next_arrays(names)
        if arrays is None:
            return None
        try:
            with self._device.activate():
                return [self._copy(name, array) for name, array in zip(names, arrays, strict=True)]
        except Exception as exc:  # a CUDA error cannot cross TensorRT's C++ frame
            self.state.record_failure(exc)
            return None

    def free(self) -> None:
        """Release the device buffers (idempotent)."""
        if not self._buffers:
            return
        with self._device.activate():
            for pointer, _ in self._buffers.values():
                self._device.free(pointer)
        self._buffers.clear()

    def _copy(self, name: str, array: np.ndarray) -> int:
        known = self._buffers.get(name)
        if known is None:
            known = (self._device.alloc(array.nbytes), array.nbytes)
            self._buffers[name] = known
        elif known[1] != array.nbytes:
            raise InvalidCalibrationSet(
                f"Calibration input '{name}' changed size between batches "
                f"({known[1]} -> {array.nbytes} bytes)."
            )
        self._device.copy_to_device(known[0], array)
        return known[0]


def make_entropy_calibrator(
    batcher: CalibrationBatcher,
    *,
    device: CudaDevice,
    cache: bytes | None = None,
    on_cache_written: CacheCallback | None = None,
) -> trt.IInt8EntropyCalibrator2:
    """An ``IInt8EntropyCalibrator2`` feeding ``batcher`` through ``device`` (a :class:`DeviceBatchFeeder`).

    With ``cache`` TensorRT reads our scales and skips calibration. Needs tensorrt and a GPU. After the
    build, call ``calibrator.state.raise_failure()`` (a cancellation or data error inside a callback
    surfaces there) and ``calibrator.free()``.
    """
    import tensorrt as trt

    state = CalibratorState(
        batcher, cache=cache, on_cache_written=on_cache_written, trt_version=trt.__version__
    )
    feeder = DeviceBatchFeeder(state, device)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc]
        def __init__(self) -> None:
            # pybind11 trampolines must have the base initialised explicitly or they crash.
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.state = state
            self.free = feeder.free

        def get_batch_size(self) -> int:
            return 1  # explicit batch: the batch is the arrays' leading dimension

        def get_batch(self, names: list[str]) -> list[int] | None:
            return feeder.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return state.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            state.write_cache(cache)

    return EntropyCalibrator()


def _cache_for(cache: bytes, trt_version: str | None) -> bytes:
    """Validate a cache up front (not deep inside a build) and re-head it for its reader.

    Zero, infinite and negative scales are kept as they are: TensorRT writes them itself and reads
    them back.
    """
    parsed = scales_from_calibration_cache(cache)
    if trt_version is None:
        return cache
    # This calibrator is an entropy calibrator: TensorRT only accepts a cache headed with its own
    # version and algorithm, whatever produced the scales.
    return calibration_cache_from_scales(parsed.scales, trt_version=trt_version, algorithm=DEFAULT_ALGORITHM)
