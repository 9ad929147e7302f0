"""Intake of ``.npy`` and ``.npz`` uploads: check each untrusted array header, then copy its data.

The data is copied in bounded pieces into the stored, memory-mappable array, checked for NaN/inf and
summarized on the way. A piece is a run of whole samples when a sample is small, or a contiguous part
of one sample when it is not, so memory stays near ``_CHUNK_BYTES`` whatever one sample's size.
Split from :mod:`service.datasets.ingest` (format detection, image archives, atomic placement)
because reading untrusted .npy streams is a concern of its own.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tokenize import TokenError
from typing import IO, Any

import numpy as np

from service.datasets.archives import SafeZip
from service.datasets.set_info import (
    UNNAMED_INPUT,
    CalibrationSetInfo,
    InputSummary,
    StatsAccumulator,
    array_file,
    stats_axis,
)
from service.datasets.zip_stream import UNBOUNDED_MEMBERS, ExpansionLimits
from service.errors import InvalidCalibrationSet

_CHUNK_BYTES = 4 * 1024 * 1024  # stats need about 4x this in float64 temporaries
_POSITIONAL_NPZ_NAME = "arr_0"
# An index into the stored array selecting one piece: leading integer indices, then one slice.
Piece = tuple[int | slice, ...]


@dataclass(frozen=True)
class _ArrayHeader:
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype[Any]  # as written in the upload, possibly big-endian

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def stored_dtype(self) -> np.dtype[Any]:
        """The dtype in native byte order, as stored and fed to runtimes."""
        return self.dtype.newbyteorder("=")

    def pieces(self) -> Iterator[Piece]:
        """Indices of consecutive C-order pieces of about _CHUNK_BYTES each (see the module docstring).

        Goes down the axes until the block under one index fits a chunk, then takes as many of those
        blocks as fit: whole samples for small samples, rows of a sample (or of a channel) otherwise.
        """
        depth = 0
        while depth < len(self.shape) - 1 and self._block_bytes(depth) > _CHUNK_BYTES:
            depth += 1
        step = max(1, _CHUNK_BYTES // self._block_bytes(depth))
        for prefix in itertools.product(*(range(dim) for dim in self.shape[:depth])):
            for first in range(0, self.shape[depth], step):
                yield (*prefix, slice(first, min(first + step, self.shape[depth])))

    def piece_shape(self, piece: Piece) -> tuple[int, ...]:
        last = piece[-1]
        assert isinstance(last, slice)  # pieces() always ends with a slice
        return (last.stop - last.start, *self.shape[len(piece) :])

    def _block_bytes(self, depth: int) -> int:
        return math.prod(self.shape[depth + 1 :]) * self.dtype.itemsize


def is_npz(
    path: Path, filename: str, max_members: int, max_bytes: int, limits: ExpansionLimits = UNBOUNDED_MEMBERS
) -> bool:
    """A zip whose members are all .npy arrays; a file named .npz must be exactly that."""
    with SafeZip(path, max_members=max_members, max_total_bytes=max_bytes, limits=limits) as archive:
        others = [name for name in archive.names if not name.endswith(".npy")]
        if filename.lower().endswith(".npz") and (others or not archive.names):
            problem = f"members {others[:5]} are not .npy arrays" if others else "it holds no arrays"
            raise InvalidCalibrationSet(
                f"'{filename}' is named like an .npz, but {problem}; save it with numpy.savez."
            )
        return bool(archive.names) and not others


def ingest_npy(upload_path: Path, filename: str, build: Path) -> CalibrationSetInfo:
    """Store a single .npy upload as the one unnamed input of a set being built in ``build``."""
    with upload_path.open("rb") as stream:
        header = _read_header(stream, f"'{filename}'")
        data_offset = stream.tell()
    if upload_path.stat().st_size - data_offset < header.nbytes:
        raise InvalidCalibrationSet(
            f"'{filename}' is truncated: its header promises more data than it holds."
        )
    target = build / array_file(0)
    if header.fortran_order:
        summary = _store_array(
            _file_chunks(upload_path, header, UNNAMED_INPUT), header, target, UNNAMED_INPUT, named=False
        )
    else:  # read sequentially rather than mapped, so the upload's pages do not join the resident set
        with upload_path.open("rb") as stream:
            stream.seek(data_offset)
            chunks = _stream_chunks(stream, header, UNNAMED_INPUT)
            summary = _store_array(chunks, header, target, UNNAMED_INPUT, named=False)
    return CalibrationSetInfo("npy", header.shape[0], (summary,), filename)


def ingest_npz(
    upload_path: Path,
    filename: str,
    build: Path,
    max_members: int,
    max_bytes: int,
    limits: ExpansionLimits = UNBOUNDED_MEMBERS,
) -> CalibrationSetInfo:
    """Store each array of an .npz upload as one input of a set being built in ``build``."""
    with SafeZip(upload_path, max_members=max_members, max_total_bytes=max_bytes, limits=limits) as archive:
        members = {name.removesuffix(".npy"): name for name in archive.names}
        headers: dict[str, _ArrayHeader] = {}
        for key in sorted(members):  # headers first: reject mismatches before copying anything
            with archive.open(members[key]) as stream:
                headers[key] = _read_header(stream, f"array '{key}'")
            if headers[key].nbytes > archive.size(members[key]):
                raise InvalidCalibrationSet(f"Array '{key}' is truncated: its header promises more data.")
        lengths = {key: header.shape[0] for key, header in headers.items()}
        if len(set(lengths.values())) > 1:
            raise InvalidCalibrationSet(
                f"Every array needs the same number of samples (first axis), got {lengths}.",
                details={"samples": lengths},
            )
        named = list(headers) != [_POSITIONAL_NPZ_NAME]
        summaries = []
        for index, (key, header) in enumerate(headers.items()):
            target = build / array_file(index)
            with archive.open(members[key]) as stream:
                _read_header(stream, f"array '{key}'")
                if header.fortran_order:
                    # Fortran order cannot be cut into samples while streaming: spill it, then copy.
                    spill = build / f".spill-{index}.npy"
                    with spill.open("wb") as out:
                        np.lib.format.write_array_header_2_0(out, _header_dict(header))
                        for first, last in _byte_chunks(header.nbytes):
                            out.write(_read_exact(stream, last - first, f"array '{key}'"))
                    summaries.append(
                        _store_array(_file_chunks(spill, header, key), header, target, key, named=named)
                    )
                    spill.unlink()
                else:
                    chunks = _stream_chunks(stream, header, key)
                    summaries.append(_store_array(chunks, header, target, key, named=named))
    return CalibrationSetInfo("npz", next(iter(lengths.values())), tuple(summaries), filename)


def _read_header(stream: IO[bytes], what: str) -> _ArrayHeader:
    """Parse an .npy header from a stream and check the array is a usable calibration input."""
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise InvalidCalibrationSet(
                f"{what} uses .npy format version {version}; save it with numpy.save."
            )
    # numpy tokenizes the header text to parse it, so damaged headers can also raise these two.
    except (ValueError, SyntaxError, TokenError) as exc:
        raise InvalidCalibrationSet(f"{what} is not a valid .npy array ({exc}).") from exc
    if dtype.hasobject:
        raise InvalidCalibrationSet(
            f"{what} is an object array (ragged or mixed-type data); pickles are refused. Stack the samples "
            "into one numeric array of equal shapes."
        )
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise InvalidCalibrationSet(
            f"{what} has dtype {dtype}; calibration data must be numeric (bool, int, uint, float16/32/64)."
        )
    if not shape:
        raise InvalidCalibrationSet(f"{what} is a scalar; the first axis must index the samples.")
    if any(dim < 0 for dim in shape):  # numpy's header parser accepts these; allocating them would fail
        raise InvalidCalibrationSet(
            f"{what} declares a negative dimension (shape {list(shape)}); it is damaged."
        )
    if shape[0] == 0:
        raise InvalidCalibrationSet(f"{what} is empty (0 samples); the set needs at least one sample.")
    if 0 in shape:
        raise InvalidCalibrationSet(f"{what} has a zero-sized axis (shape {list(shape)}); samples need data.")
    return _ArrayHeader(tuple(int(d) for d in shape), bool(fortran_order), dtype)


def _header_dict(header: _ArrayHeader) -> dict[str, Any]:
    return {
        "descr": np.lib.format.dtype_to_descr(header.dtype),
        "fortran_order": header.fortran_order,
        "shape": header.shape,
    }


def _stream_chunks(stream: IO[bytes], header: _ArrayHeader, name: str) -> Iterator[tuple[Piece, np.ndarray]]:
    """Consecutive pieces of C-ordered array data read from a stream."""
    for piece in header.pieces():
        shape = header.piece_shape(piece)
        data = _read_exact(stream, math.prod(shape) * header.dtype.itemsize, f"array '{name}'")
        yield piece, np.frombuffer(data, dtype=header.dtype).reshape(shape)


def _file_chunks(path: Path, header: _ArrayHeader, name: str) -> Iterator[tuple[Piece, np.ndarray]]:
    """Consecutive pieces of a memory-mapped .npy file (either order), copied out one at a time."""
    try:
        source = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidCalibrationSet(f"Array '{name}' cannot be read ({exc}).") from exc
    for piece in header.pieces():
        yield piece, np.ascontiguousarray(source[piece])


def _store_array(
    chunks: Iterator[tuple[Piece, np.ndarray]],
    header: _ArrayHeader,
    target_path: Path,
    name: str,
    *,
    named: bool,
) -> InputSummary:
    """Write pieces into a new C-ordered, native-endian .npy, checking and summarizing them.

    Pieces arrive in C order, so they are appended with plain writes: a memory map would count every
    written page in the server's resident set until the kernel chose to drop it.
    """
    sample_shape = header.shape[1:]
    axis = stats_axis(sample_shape)
    stats = StatsAccumulator(axis, sample_shape[0] if axis is not None else 1)
    with target_path.open("wb") as out:
        np.lib.format.write_array_header_2_0(
            out,
            {
                "descr": np.lib.format.dtype_to_descr(header.stored_dtype),
                "fortran_order": False,
                "shape": header.shape,
            },
        )
        for piece, chunk in chunks:
            _check_finite(chunk, name, piece)
            out.write(np.ascontiguousarray(chunk, dtype=header.stored_dtype).data)
            batch, channels = _stats_view(piece, chunk, axis)
            stats.update(batch, channels)
    return InputSummary(name, named, sample_shape, header.stored_dtype.name, stats.result())


def _stats_view(piece: Piece, chunk: np.ndarray, axis: int | None) -> tuple[np.ndarray, slice]:
    """The piece as a batch for StatsAccumulator, and which channels it covers."""
    if len(piece) == 1 or axis is None:  # whole samples, or statistics over the whole tensor
        return (chunk if len(piece) == 1 else chunk.reshape(1, -1)), slice(None)
    channel = piece[1]  # axis is 1: the first per-sample axis holds the channels
    if isinstance(channel, slice):
        return chunk[np.newaxis], channel
    return chunk.reshape(1, 1, -1), slice(channel, channel + 1)


def _byte_chunks(total: int) -> Iterator[tuple[int, int]]:
    for first in range(0, total, _CHUNK_BYTES):
        yield first, min(first + _CHUNK_BYTES, total)


def _read_exact(stream: IO[bytes], size: int, what: str) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        part = stream.read(remaining)
        if not part:
            raise InvalidCalibrationSet(f"{what} is truncated: its data ends before its header says.")
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _check_finite(chunk: np.ndarray, name: str, piece: Piece) -> None:
    if chunk.dtype.kind != "f":
        return
    finite = np.isfinite(chunk).reshape(chunk.shape[0], -1).all(axis=1)
    if not finite.all():
        lead = piece[0]
        sample = lead.start + int(np.argmin(finite)) if isinstance(lead, slice) else lead
        raise InvalidCalibrationSet(
            f"Array '{name}' has NaN or infinite values (first at sample {sample}); "
            "calibration needs finite data, so fix or drop those samples."
        )


def flush_array(array: np.ndarray) -> None:
    """Write a memory-mapped array's pages to its file (a no-op for in-memory arrays)."""
    if isinstance(array, np.memmap):
        array.flush()
