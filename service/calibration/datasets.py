"""Calibration sets: ingest an upload into its stored form, describe it, read it in batches, bind it.

Accepted uploads, recognised by content (the filename is only a hint for error messages):

* ``.npz``: one array per model input name, first axis = samples (read with pickles refused);
* ``.npy``: one array for a single-input model;
* ``.zip`` / ``.tar`` / ``.tar.gz`` (``.tgz``, also bzip2/xz) of PNG/JPEG images plus a
  :class:`PreprocessSpec` that turns each image into one sample.

The stored form is a directory holding ``input_<i>.npy`` per input (C order, native byte order,
sample axis first, memory-mappable) and ``info.json`` (:class:`CalibrationSetInfo`). It is built in
a temporary sibling directory and renamed into place, so a failed ingest leaves nothing behind.
Everything streams: arrays are copied in chunks, images are decoded one at a time straight into a
memory-mapped file, statistics are accumulated chunk by chunk, and :meth:`CalibrationSet.batches`
copies only the batch it yields, so memory does not grow with the number of samples.

``.npy`` and image sets hold one unnamed input (stored as ``input``), as does an ``.npz`` whose only
array is numpy's positional ``arr_0``; an unnamed input binds to any single-input model. Binding
rules are in :func:`bind_to_model`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from tokenize import TokenError
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np

from service.calibration.archives import (
    ArchiveKind,
    SafeZip,
    SkippedMember,
    read_images,
    scan_archive,
    tar_compression,
)
from service.calibration.preprocess import PreprocessSpec, image_to_array
from service.errors import BadInput, Conflict, InvalidCalibrationSet, NotFound, TooLarge

if TYPE_CHECKING:
    from service.onnx_graph.inspect import TensorSpec

SetFormat = Literal["npz", "npy", "images"]
UNNAMED_INPUT = "input"
INFO_FILE = "info.json"
MAX_REPORTED_SKIPPED = 200
# Per-channel statistics for rank-4 arrays with at most this many channels on axis 1.
MAX_STAT_CHANNELS = 64
_CHUNK_BYTES = 4 * 1024 * 1024  # stats need about 4x this in float64 temporaries
_POSITIONAL_NPZ_NAME = "arr_0"
_SUPPORTED = "an .npz, an .npy, or a .zip/.tar/.tar.gz of PNG/JPEG images"
_PREPROCESS_EXAMPLE = (
    '{"size": [224, 224], "resize": "shorter_side_center_crop", "mean": [0.485, 0.456, 0.406], '
    '"std": [0.229, 0.224, 0.225]}'
)


@dataclass(frozen=True)
class ChannelStats:
    """min/max/mean/std (population) per channel, or one entry for the whole tensor.

    ``axis`` is the channel axis of the stored array (axis 0 = samples): 1 for NCHW-like rank-4
    arrays and NCHW images, 3 for NHWC images, None when the statistics cover the whole tensor.
    """

    axis: int | None
    min: tuple[float, ...]
    max: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class InputSummary:
    """One stored input. ``shape`` is the per-sample shape, without the sample axis."""

    name: str
    named: bool
    shape: tuple[int, ...]
    dtype: str
    stats: ChannelStats


@dataclass(frozen=True)
class CalibrationSetInfo:
    """What an ingested set holds. ``skipped`` lists up to MAX_REPORTED_SKIPPED of ``skipped_count``."""

    format: SetFormat
    samples: int
    inputs: tuple[InputSummary, ...]
    source_filename: str
    preprocess: PreprocessSpec | None = None
    skipped: tuple[SkippedMember, ...] = ()
    skipped_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "samples": self.samples,
            "inputs": [
                {
                    "name": item.name,
                    "named": item.named,
                    "shape": list(item.shape),
                    "dtype": item.dtype,
                    "stats": {
                        "axis": item.stats.axis,
                        "min": list(item.stats.min),
                        "max": list(item.stats.max),
                        "mean": list(item.stats.mean),
                        "std": list(item.stats.std),
                    },
                }
                for item in self.inputs
            ],
            "source_filename": self.source_filename,
            "preprocess": self.preprocess.model_dump(mode="json") if self.preprocess else None,
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "skipped_count": self.skipped_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationSetInfo:
        inputs = tuple(
            InputSummary(
                name=item["name"],
                named=bool(item["named"]),
                shape=tuple(int(d) for d in item["shape"]),
                dtype=item["dtype"],
                stats=ChannelStats(
                    axis=item["stats"]["axis"],
                    min=tuple(item["stats"]["min"]),
                    max=tuple(item["stats"]["max"]),
                    mean=tuple(item["stats"]["mean"]),
                    std=tuple(item["stats"]["std"]),
                ),
            )
            for item in data["inputs"]
        )
        spec = data.get("preprocess")
        return cls(
            format=data["format"],
            samples=int(data["samples"]),
            inputs=inputs,
            source_filename=data["source_filename"],
            preprocess=PreprocessSpec.model_validate(spec) if spec is not None else None,
            skipped=tuple(SkippedMember(s["name"], s["reason"]) for s in data.get("skipped", ())),
            skipped_count=int(data.get("skipped_count", 0)),
        )


class StatsAccumulator:
    """Streaming per-channel statistics (Chan et al.'s pairwise mean/variance merge, in float64)."""

    def __init__(self, channel_axis: int | None, channels: int) -> None:
        self.axis = channel_axis
        size = channels if channel_axis is not None else 1
        self.count = 0
        self.low = np.full(size, np.inf)
        self.high = np.full(size, -np.inf)
        self.mean = np.zeros(size)
        self.m2 = np.zeros(size)

    def update(self, batch: np.ndarray) -> None:
        """Fold in a batch (sample axis first)."""
        values = batch.astype(np.float64)
        if self.axis is None:
            values = values.reshape(1, -1)
        else:
            values = np.moveaxis(values, self.axis, 0).reshape(values.shape[self.axis], -1)
        count = values.shape[1]
        if count == 0:
            return
        self.low = np.minimum(self.low, values.min(axis=1))
        self.high = np.maximum(self.high, values.max(axis=1))
        batch_mean = values.mean(axis=1)
        batch_m2 = ((values - batch_mean[:, np.newaxis]) ** 2).sum(axis=1)
        total = self.count + count
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * count / total)
        self.count = total

    def result(self) -> ChannelStats:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return ChannelStats(
            axis=self.axis,
            min=tuple(float(v) for v in self.low),
            max=tuple(float(v) for v in self.high),
            mean=tuple(float(v) for v in self.mean),
            std=tuple(float(v) for v in std),
        )


def stats_axis(sample_shape: tuple[int, ...]) -> int | None:
    """The channel axis used for statistics of an array input (see :class:`ChannelStats`)."""
    if len(sample_shape) == 3 and sample_shape[0] <= MAX_STAT_CHANNELS:
        return 1
    return None


def ingest_calibration_upload(
    upload_path: Path,
    filename: str,
    dest_dir: Path,
    *,
    preprocess: PreprocessSpec | None,
    max_members: int,
    max_uncompressed_bytes: int,
) -> CalibrationSetInfo:
    """Validate the upload at ``upload_path`` and write its stored form to ``dest_dir`` (must not exist).

    Raises InvalidCalibrationSet for malformed or unusable data, UnsafeArchive for archives with
    unsafe members, TooLarge past the bounds, Conflict when ``dest_dir`` exists. On any error
    nothing is left in ``dest_dir``'s parent.
    """
    if dest_dir.exists():
        raise Conflict(f"A calibration set is already stored at {dest_dir}.")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest_dir.parent))
    try:
        kind = _detect_container(upload_path, filename)
        if kind == "npy":
            _require_no_preprocess(preprocess, "an .npy array")
            info = _ingest_npy(upload_path, filename, build)
        elif kind == "zip" and _is_npz(upload_path, filename, max_members, max_uncompressed_bytes):
            _require_no_preprocess(preprocess, "an .npz archive")
            info = _ingest_npz(upload_path, filename, build, max_members, max_uncompressed_bytes)
        else:
            if preprocess is None:
                raise InvalidCalibrationSet(
                    "Image archives need a 'preprocess' JSON that says how images become model inputs, "
                    f"for example {_PREPROCESS_EXAMPLE}."
                )
            info = _ingest_images(
                upload_path, kind, filename, build, preprocess, max_members, max_uncompressed_bytes
            )
        (build / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=1))
        for path in build.iterdir():
            _fsync(path)
        os.rename(build, dest_dir)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _fsync(dest_dir.parent)  # make the rename itself durable
    return info


class CalibrationSet:
    """A stored calibration set, read lazily from its memory-mapped arrays."""

    def __init__(self, directory: Path, info: CalibrationSetInfo) -> None:
        self.directory = directory
        self.info = info

    @classmethod
    def open(cls, directory: Path) -> CalibrationSet:
        """Open a stored set; NotFound when absent, InvalidCalibrationSet when its files disagree."""
        try:
            raw = json.loads((directory / INFO_FILE).read_text())
        except FileNotFoundError as exc:
            raise NotFound(f"No calibration set is stored at {directory}.") from exc
        try:
            info = CalibrationSetInfo.from_dict(raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidCalibrationSet(
                f"The stored set at {directory} has an unreadable info file."
            ) from exc
        opened = cls(directory, info)
        for index, item in enumerate(info.inputs):
            array = opened._memmap(index)
            if array.shape != (info.samples, *item.shape) or array.dtype.name != item.dtype:
                raise InvalidCalibrationSet(
                    f"The stored array for '{item.name}' in {directory} does not match its description; "
                    "delete the set and upload it again."
                )
        return opened

    @property
    def samples(self) -> int:
        return self.info.samples

    def batches(
        self,
        batch_size: int,
        *,
        start: int = 0,
        stop: int | None = None,
        bind: Mapping[str, str] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Samples ``start:stop`` in order, ``batch_size`` at a time (the last batch may be shorter).

        Keys are the stored names, or the model input names of ``bind`` (model name -> stored name,
        as returned by :func:`bind_to_model`). Each batch is a fresh C-contiguous copy.
        """
        stop = self.samples if stop is None else stop
        if batch_size < 1:
            raise BadInput(f"batch_size must be at least 1, got {batch_size}.")
        if not 0 <= start <= stop <= self.samples:
            raise BadInput(f"Sample range {start}:{stop} is outside the set's {self.samples} samples.")
        positions = {item.name: index for index, item in enumerate(self.info.inputs)}
        binding = dict(bind) if bind is not None else {name: name for name in positions}
        unknown = sorted(set(binding.values()) - set(positions))
        if unknown:
            raise BadInput(f"The set holds no arrays named {unknown}; it holds {sorted(positions)}.")
        return self._batches(batch_size, start, stop, {key: positions[name] for key, name in binding.items()})

    def _batches(
        self, batch_size: int, start: int, stop: int, sources: dict[str, int]
    ) -> Iterator[dict[str, np.ndarray]]:
        arrays = {key: self._memmap(index) for key, index in sources.items()}
        try:
            for first in range(start, stop, batch_size):
                last = min(first + batch_size, stop)
                yield {key: np.array(array[first:last]) for key, array in arrays.items()}
        finally:
            arrays.clear()  # drop the mappings as soon as the caller stops iterating

    def split(self, holdout_fraction: float) -> tuple[range, range]:
        """(calibration samples, held-out samples): the last ``round(n * fraction)`` samples are held out.

        A positive fraction holds out at least one sample and leaves at least one for calibration.
        Image sets are ordered by member name, so name images so that the tail is representative.
        """
        if not 0.0 <= holdout_fraction < 1.0:
            raise BadInput(f"holdout_fraction must be in [0, 1), got {holdout_fraction}.")
        total = self.samples
        held = math.floor(total * holdout_fraction + 0.5)
        if holdout_fraction > 0:
            if total < 2:
                raise InvalidCalibrationSet(
                    "The set has a single sample; holding some out for the accuracy check needs at least 2."
                )
            held = min(max(held, 1), total - 1)
        return range(0, total - held), range(total - held, total)

    def _memmap(self, index: int) -> np.ndarray:
        path = self.directory / _array_file(index)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidCalibrationSet(
                f"The stored array {path} cannot be read ({exc}); delete the set and upload it again."
            ) from exc


def bind_to_model(info: CalibrationSetInfo, model_inputs: Sequence[TensorSpec]) -> dict[str, str]:
    """Map each model input name to the stored array that feeds it, or say everything that does not fit.

    Names must match exactly (an unnamed set binds to a single-input model). The sample axis maps
    to the model's first (batch) dim, whatever it is: a model exported with a fixed batch of 1
    takes the set one sample per batch (``batches(1)``), or a consumer relaxes that dim. Every other
    fixed dim must equal the sample's; symbolic dims accept any size but one symbol must mean one
    size across inputs. Dtypes must match exactly: nothing is cast implicitly, not even float16 to
    float32, because the data should be what the deployed model is fed.
    """
    if not model_inputs:
        raise InvalidCalibrationSet("The model has no inputs to calibrate.")
    model_names = [spec.name for spec in model_inputs]
    if len(info.inputs) == 1 and not info.inputs[0].named:
        if len(model_inputs) != 1:
            raise InvalidCalibrationSet(
                f"The set holds one unnamed array (uploaded as {info.format}), but the model has "
                f"{len(model_inputs)} inputs {model_names}; upload an .npz with one array per input name."
            )
        pairs = [(model_inputs[0], info.inputs[0])]
    else:
        stored = {item.name: item for item in info.inputs}
        missing = [name for name in model_names if name not in stored]
        extra = sorted(set(stored) - set(model_names))
        if missing or extra:
            parts = [f"missing arrays for model inputs {missing}"] if missing else []
            parts += [f"arrays {extra} that are not model inputs"] if extra else []
            raise InvalidCalibrationSet(
                f"The set's array names do not match the model's inputs {model_names}: {'; '.join(parts)}.",
                details={"missing": missing, "extra": extra},
            )
        pairs = [(spec, stored[spec.name]) for spec in model_inputs]
    problems = [problem for spec, item in pairs for problem in _fit_problems(spec, item, info.format)]
    problems += _symbol_conflicts(pairs)
    if problems:
        raise InvalidCalibrationSet(
            "The calibration set does not fit the model: " + "; ".join(problems),
            details={"problems": problems},
        )
    return {spec.name: item.name for spec, item in pairs}


def _fit_problems(spec: TensorSpec, item: InputSummary, set_format: SetFormat) -> list[str]:
    problems: list[str] = []
    data_shape = ["samples", *item.shape]
    if len(spec.shape) != len(data_shape):
        hint = ""
        if len(data_shape) == len(spec.shape) + 1 and item.shape and item.shape[0] == 1:
            hint = " (each sample carries its own batch axis of 1: drop it, e.g. x[:, 0])"
        elif not spec.shape:
            hint = " (a scalar input has no batch axis to put samples on)"
        problems.append(
            f"input '{spec.name}' has rank {len(spec.shape)} {list(spec.shape)}, but the data has rank "
            f"{len(data_shape)} {data_shape} with the sample axis first{hint}"
        )
    else:
        wrong = [
            f"axis {axis} is {want} in the model but {got} in the data"
            for axis, (want, got) in enumerate(zip(spec.shape[1:], item.shape, strict=True), start=1)
            if isinstance(want, int) and want != got
        ]
        if wrong:
            fixed = [d for d in spec.shape[1:] if isinstance(d, int)]
            permuted = len(fixed) == len(item.shape) and sorted(fixed) == sorted(item.shape)
            hint = " (the axes look permuted: check the NCHW/NHWC layout)" if permuted else ""
            problems.append(f"input '{spec.name}' {list(spec.shape)}: {', '.join(wrong)}{hint}")
    if spec.dtype == "unknown":
        problems.append(f"input '{spec.name}' is not a plain tensor and cannot be fed from an array")
    elif spec.dtype != item.dtype:
        fix = (
            "set the preprocess dtype" if set_format == "images" else f"save it with .astype(np.{spec.dtype})"
        )
        problems.append(
            f"input '{spec.name}' expects {spec.dtype} but the data is {item.dtype}; nothing is cast "
            f"implicitly, {fix}"
        )
    return problems


def _symbol_conflicts(pairs: Sequence[tuple[TensorSpec, InputSummary]]) -> list[str]:
    seen: dict[str, tuple[str, int]] = {}
    problems: list[str] = []
    for spec, item in pairs:
        if len(spec.shape) != len(item.shape) + 1:
            continue  # already reported as a rank mismatch
        for dim, size in zip(spec.shape[1:], item.shape, strict=True):
            if not isinstance(dim, str) or dim == "?":
                continue
            first = seen.setdefault(dim, (spec.name, size))
            if first[1] != size:
                problems.append(
                    f"dim '{dim}' is {first[1]} in '{first[0]}' but {size} in '{spec.name}'; "
                    "one symbol must have one size"
                )
    return problems


# --- ingest ------------------------------------------------------------------------------------


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


def _array_file(index: int) -> str:
    return f"input_{index}.npy"


def _detect_container(path: Path, filename: str) -> Literal["npy", "zip", "tar"]:
    with path.open("rb") as stream:
        head = stream.read(512)
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if tar_compression(head) or head[257:262] == b"ustar":
        return "tar"
    if not head:
        raise InvalidCalibrationSet(f"The upload is empty; send {_SUPPORTED}.")
    raise InvalidCalibrationSet(
        f"'{filename}' is not a recognised calibration set (by content); send {_SUPPORTED}."
    )


def _is_npz(path: Path, filename: str, max_members: int, max_bytes: int) -> bool:
    """A zip whose members are all .npy arrays; a file named .npz must be exactly that."""
    with SafeZip(path, max_members=max_members, max_total_bytes=max_bytes) as archive:
        others = [name for name in archive.names if not name.endswith(".npy")]
        if filename.lower().endswith(".npz") and (others or not archive.names):
            problem = f"members {others[:5]} are not .npy arrays" if others else "it holds no arrays"
            raise InvalidCalibrationSet(
                f"'{filename}' is named like an .npz, but {problem}; save it with numpy.savez."
            )
        return bool(archive.names) and not others


def _require_no_preprocess(preprocess: PreprocessSpec | None, what: str) -> None:
    if preprocess is not None:
        raise InvalidCalibrationSet(
            f"A 'preprocess' spec only applies to image archives, but the upload is {what}; "
            "send the arrays already preprocessed and drop the field."
        )


def _ingest_npy(upload_path: Path, filename: str, build: Path) -> CalibrationSetInfo:
    with upload_path.open("rb") as stream:
        header = _read_header(stream, f"'{filename}'")
        data_offset = stream.tell()
    if upload_path.stat().st_size - data_offset < header.nbytes:
        raise InvalidCalibrationSet(
            f"'{filename}' is truncated: its header promises more data than it holds."
        )
    chunks = _file_chunks(upload_path, header, UNNAMED_INPUT)
    summary = _store_array(chunks, header, build / _array_file(0), UNNAMED_INPUT, named=False)
    return CalibrationSetInfo("npy", header.shape[0], (summary,), filename)


def _ingest_npz(
    upload_path: Path, filename: str, build: Path, max_members: int, max_bytes: int
) -> CalibrationSetInfo:
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
            target = build / _array_file(index)
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


def _ingest_images(
    upload_path: Path,
    kind: ArchiveKind,
    filename: str,
    build: Path,
    spec: PreprocessSpec,
    max_members: int,
    max_bytes: int,
) -> CalibrationSetInfo:
    listing = scan_archive(upload_path, kind, max_members=max_members, max_total_bytes=max_bytes)
    if not listing.images:
        examples = ", ".join(f"'{s.name}' ({s.reason})" for s in listing.skipped[:3])
        raise InvalidCalibrationSet(
            f"'{filename}' holds no PNG or JPEG images" + (f"; skipped {examples}" if examples else "") + ".",
            details={"skipped": [{"name": s.name, "reason": s.reason} for s in listing.skipped[:50]]},
        )
    count = len(listing.images)
    target: np.ndarray | None = None
    first_name = ""
    stats = StatsAccumulator(spec.channel_axis, spec.channels)
    for member in read_images(upload_path, listing, max_total_bytes=max_bytes):
        sample = image_to_array(member.data, spec, name=member.name)
        if target is None:
            stored_bytes = count * sample.nbytes
            if stored_bytes > max_bytes:
                raise TooLarge(
                    f"{count} preprocessed images of shape {list(sample.shape)} ({sample.dtype}) take "
                    f"{stored_bytes} bytes, over the limit of {max_bytes}; send fewer images or pick a "
                    "smaller size."
                )
            target = np.lib.format.open_memmap(
                build / _array_file(0), mode="w+", dtype=sample.dtype, shape=(count, *sample.shape)
            )
            first_name = member.name
        elif sample.shape != target.shape[1:]:
            raise InvalidCalibrationSet(
                f"Images differ in size: '{first_name}' gives {_image_size(target.shape[1:], spec)} but "
                f"'{member.name}' gives {_image_size(sample.shape, spec)}; add \"size\": [height, width] "
                "to preprocess so every image is resized."
            )
        target[member.index] = sample
        stats.update(sample[np.newaxis])
    if target is None:  # unreachable: scan_archive listed these images
        raise InvalidCalibrationSet(f"'{filename}' yielded no images on the second read.")
    _flush(target)
    summary = InputSummary(UNNAMED_INPUT, False, tuple(target.shape[1:]), target.dtype.name, stats.result())
    return CalibrationSetInfo(
        "images",
        count,
        (summary,),
        filename,
        preprocess=spec,
        skipped=listing.skipped[:MAX_REPORTED_SKIPPED],
        skipped_count=len(listing.skipped),
    )


def _image_size(sample_shape: tuple[int, ...], spec: PreprocessSpec) -> str:
    height, width = sample_shape[1:3] if spec.layout == "NCHW" else sample_shape[0:2]
    return f"{width}x{height}"


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
    _flush(target)
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


def _flush(array: np.ndarray) -> None:
    if isinstance(array, np.memmap):
        array.flush()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
