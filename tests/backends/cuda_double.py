"""A recording stand-in for :class:`service.backends.cuda_device.CudaDevice` (no GPU exists here).

Device memory is simulated with host byte arrays, so what is copied in can be read back and a copy
past the end of an allocation fails exactly where the real GPU would read or write out of bounds.
Every call is recorded: allocations and frees, copies (pointer, bytes, dtype, shape, stream),
streams, events, graphs, and the context push/pop sequence with its depth, which must be balanced
and may only be non-zero around device work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import DTypeLike


class OutOfBounds(RuntimeError):
    """A copy touched bytes beyond the end of its allocation."""


@dataclass(frozen=True)
class Copy:
    direction: str  # "h2d" or "d2h"
    pointer: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    stream: int | None


@dataclass
class RecordingDevice:
    """Implements the CudaDevice Protocol on host memory and records every call."""

    name: str = "Recording GPU"
    memory: dict[int, bytearray] = field(default_factory=dict)
    freed: list[int] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)
    context_log: list[str] = field(default_factory=list)
    depth: int = 0
    streams: set[int] = field(default_factory=set)
    events: set[int] = field(default_factory=set)
    graphs: set[int] = field(default_factory=set)
    graph_launches: list[int] = field(default_factory=list)
    captures: int = 0
    pinned: list[np.ndarray] = field(default_factory=list)
    _next: int = 0x1000

    @contextmanager
    def activate(self) -> Iterator[None]:
        self.depth += 1
        self.context_log.append("push")
        try:
            yield
        finally:
            self.depth -= 1
            self.context_log.append("pop")

    def alloc(self, nbytes: int) -> int:
        self._require_context("alloc")
        pointer = self._handle()
        self.memory[pointer] = bytearray(max(nbytes, 1))
        return pointer

    def free(self, pointer: int) -> None:
        self._require_context("free")
        del self.memory[pointer]
        self.freed.append(pointer)

    def host_array(self, count: int, dtype: DTypeLike) -> np.ndarray:
        self._require_context("host_array")
        array = np.zeros(max(count, 1), dtype=dtype)
        self.pinned.append(array)
        return array

    def free_host(self, array: np.ndarray) -> None:
        self._require_context("free_host")
        self.pinned = [a for a in self.pinned if a is not array]

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: int | None = None) -> None:
        self._record("h2d", pointer, array, stream)
        self.memory[pointer][: array.nbytes] = np.ascontiguousarray(array).tobytes()

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: int | None = None) -> None:
        self._record("d2h", pointer, array, stream)
        flat = np.frombuffer(bytes(self.memory[pointer][: array.nbytes]), dtype=array.dtype)
        array[...] = flat.reshape(array.shape)

    def read(self, pointer: int, dtype: DTypeLike, shape: tuple[int, ...]) -> np.ndarray:
        """What device memory at ``pointer`` holds, as an array (what TensorRT would read)."""
        count = int(np.prod(shape))
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes > len(self.memory[pointer]):
            raise OutOfBounds(f"reading {nbytes} bytes from an allocation of {len(self.memory[pointer])}")
        return np.frombuffer(bytes(self.memory[pointer][:nbytes]), dtype=dtype).reshape(shape)

    def write(self, pointer: int, array: np.ndarray) -> None:
        """Store ``array`` at ``pointer`` (what a TensorRT kernel would write)."""
        if array.nbytes > len(self.memory[pointer]):
            raise OutOfBounds(
                f"writing {array.nbytes} bytes into an allocation of {len(self.memory[pointer])}"
            )
        self.memory[pointer][: array.nbytes] = array.tobytes()

    def create_stream(self) -> int:
        self._require_context("create_stream")
        stream = self._handle()
        self.streams.add(stream)
        return stream

    def destroy_stream(self, stream: int) -> None:
        self._require_context("destroy_stream")
        self.streams.remove(stream)

    def synchronize(self, stream: int) -> None:
        self._require_context("synchronize")
        assert stream in self.streams

    def create_event(self) -> int:
        self._require_context("create_event")
        event = self._handle()
        self.events.add(event)
        return event

    def destroy_event(self, event: int) -> None:
        self._require_context("destroy_event")
        self.events.remove(event)

    def record_event(self, event: int, stream: int) -> None:
        self._require_context("record_event")
        assert event in self.events and stream in self.streams

    def elapsed_ms(self, start: int, end: int) -> float:
        return 0.25

    def capture_graph(self, stream: int, enqueue: Callable[[], None]) -> int:
        self._require_context("capture_graph")
        self.captures += 1
        self._capturing = True
        try:
            enqueue()
        finally:
            self._capturing = False
        graph = self._handle()
        self.graphs.add(graph)
        return graph

    @property
    def capturing(self) -> bool:
        """True while ``capture_graph`` runs its enqueue (work is recorded, not executed)."""
        return getattr(self, "_capturing", False)

    def launch_graph(self, graph: int, stream: int) -> None:
        self._require_context("launch_graph")
        assert graph in self.graphs
        self.graph_launches.append(graph)
        self.on_graph_launch(graph)

    def on_graph_launch(self, graph: int) -> None:
        """Overridden by a test's TensorRT double to replay the captured work."""

    def destroy_graph(self, graph: int) -> None:
        self._require_context("destroy_graph")
        self.graphs.remove(graph)

    @property
    def balanced(self) -> bool:
        return self.depth == 0 and self.context_log.count("push") == self.context_log.count("pop")

    @property
    def live_allocations(self) -> int:
        return len(self.memory)

    def _record(self, direction: str, pointer: int, array: np.ndarray, stream: int | None) -> None:
        self._require_context(direction)
        if pointer not in self.memory:
            raise OutOfBounds(f"{direction} to unknown device pointer {pointer:#x}")
        if array.nbytes > len(self.memory[pointer]):
            raise OutOfBounds(
                f"{direction} of {array.nbytes} bytes at {pointer:#x}, an allocation of "
                f"{len(self.memory[pointer])} bytes"
            )
        self.copies.append(
            Copy(direction, pointer, array.nbytes, array.dtype.name, tuple(array.shape), stream)
        )

    def _require_context(self, what: str) -> None:
        if self.depth <= 0:
            raise AssertionError(f"{what} called with no CUDA context pushed")

    def _handle(self) -> int:
        self._next += 0x1000
        return self._next
