"""Intake of ``.npy`` and ``.npz`` uploads: check each untrusted array header, then copy its data.

The data is copied in bounded chunks into the stored, memory-mappable array, checked for NaN/inf and
summarized on the way. Split from :mod:`service.calibration.ingest` (format detection, image archives,
atomic placement) because reading untrusted .npy streams is a concern of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tokenize import TokenError
from typing import IO, Any

import numpy as np

from service.calibration.archives import SafeZip
from service.calibration.set_info import (
    UNNAMED_INPUT,
    CalibrationSetInfo,
    InputSummary,
    StatsAccumulator,
    array_file,
    stats_axis,
)
from service.errors import InvalidCalibrationSet

_CHUNK_BYTES = 4 * 1024 * 1024  # stats need about 4x this in float64 temporaries
_POSITIONAL_NPZ_NAME = "arr_0"


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

    def row_chunks(self) -> Iterator[tuple[int, int]]:
        """(first, last) sample ranges of about _CHUNK_BYTES each, at least one sample each."""
        rows = max(1, _CHUNK_BYTES // (self.nbytes // self.shape[0]))
        for first in range(0, self.shape[0], rows):
            yield first, min(first + rows, self.shape[0])


def is_npz(path: Path, filename: str, max_members: int, max_bytes: int) -> bool:
    """A zip whose members are all .npy arrays; a file named .npz must be exactly that."""
    with SafeZip(path, max_members=max_members, max_total_bytes=max_bytes) as archive:
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
    chunks = _file_chunks(upload_path, header, UNNAMED_INPUT)
    summary = _store_array(chunks, header, build / array_file(0), UNNAMED_INPUT, named=False)
    return CalibrationSetInfo("npy", header.shape[0], (summary,), filename)


def ingest_npz(
    upload_path: Path, filename: str, build: Path, max_members: int, max_bytes: int
) -> CalibrationSetInfo:
    """Store each array of an .npz upload as one input of a set being built in ``build``."""
    with SafeZip(upload_path, max_members=max_members, max_total_bytes=max_bytes) as archive:
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


def _stream_chunks(stream: IO[bytes], header: _ArrayHeader, name: str) -> Iterator[np.ndarray]:
    """Consecutive sample chunks of C-ordered array data read from a stream."""
    row_bytes = header.nbytes // header.shape[0]
    for first, last in header.row_chunks():
        data = _read_exact(stream, (last - first) * row_bytes, f"array '{name}'")
        yield np.frombuffer(data, dtype=header.dtype).reshape((last - first, *header.shape[1:]))


def _file_chunks(path: Path, header: _ArrayHeader, name: str) -> Iterator[np.ndarray]:
    """Consecutive sample chunks of a memory-mapped .npy file (either order), copied out one at a time."""
    try:
        source = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InvalidCalibrationSet(f"Array '{name}' cannot be read ({exc}).") from exc
    for first, last in header.row_chunks():
        yield np.ascontiguousarray(source[first:last])


def _store_array(
    chunks: Iterator[np.ndarray], header: _ArrayHeader, target_path: Path, name: str, *, named: bool
) -> InputSummary:
    """Write sample chunks into a new C-ordered, native-endian .npy, checking and summarizing them."""
    target = np.lib.format.open_memmap(target_path, mode="w+", dtype=header.stored_dtype, shape=header.shape)
    sample_shape = header.shape[1:]
    axis = stats_axis(sample_shape)
    stats = StatsAccumulator(axis, sample_shape[0] if axis is not None else 1)
    first = 0
    for chunk in chunks:
        _check_finite(chunk, name, first)
        target[first : first + len(chunk)] = chunk
        stats.update(chunk)
        first += len(chunk)
    flush_array(target)
    return InputSummary(name, named, sample_shape, header.stored_dtype.name, stats.result())


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


def _check_finite(chunk: np.ndarray, name: str, first: int) -> None:
    if chunk.dtype.kind != "f":
        return
    finite = np.isfinite(chunk).reshape(chunk.shape[0], -1).all(axis=1)
    if not finite.all():
        raise InvalidCalibrationSet(
            f"Array '{name}' has NaN or infinite values (first at sample {first + int(np.argmin(finite))}); "
            "calibration needs finite data, so fix or drop those samples."
        )


def flush_array(array: np.ndarray) -> None:
    """Write a memory-mapped array's pages to its file (a no-op for in-memory arrays)."""
    if isinstance(array, np.memmap):
        array.flush()
