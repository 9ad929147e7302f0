"""Calibration-set intake: turn an upload into the stored form that :mod:`service.datasets.storage` reads.

Accepted uploads, recognised by content (the filename is only a hint for error messages):

* ``.npz``: one array per model input name, first axis = samples (read with pickles refused);
* ``.npy``: one array for a single-input model;
* ``.zip`` / ``.tar`` / ``.tar.gz`` (``.tgz``, also bzip2/xz) of PNG/JPEG images plus a
  :class:`PreprocessSpec` that turns each image into one sample.

The stored form (described in :mod:`service.datasets.set_info`) is built in a temporary sibling
directory and renamed into place, so a failed ingest leaves nothing behind. Everything streams: arrays
are copied in chunks (:mod:`service.datasets.ingest_arrays`), images are decoded one at a time
straight into a memory-mapped file, and statistics are accumulated chunk by chunk, so memory does not
grow with the number of samples.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np

from service.datasets.archives import ArchiveKind, read_images, scan_archive, tar_compression
from service.datasets.ingest_arrays import flush_array, ingest_npy, ingest_npz, is_npz
from service.datasets.preprocess import (
    UNBOUNDED_PREPROCESS,
    PreprocessLimits,
    PreprocessSpec,
    image_to_array,
)
from service.datasets.set_info import (
    INFO_FILE,
    MAX_REPORTED_SKIPPED,
    UNNAMED_INPUT,
    CalibrationSetInfo,
    InputSummary,
    StatsAccumulator,
    array_file,
)
from service.datasets.zip_stream import UNBOUNDED_MEMBERS, ExpansionLimits
from service.errors import Conflict, InvalidCalibrationSet, TooLarge

_SUPPORTED = "an .npz, an .npy, or a .zip/.tar/.tar.gz of PNG/JPEG images"
_PREPROCESS_EXAMPLE = (
    '{"size": [224, 224], "resize": "shorter_side_center_crop", "mean": [0.485, 0.456, 0.406], '
    '"std": [0.229, 0.224, 0.225]}'
)


def ingest_calibration_upload(
    upload_path: Path,
    filename: str,
    dest_dir: Path,
    *,
    preprocess: PreprocessSpec | None,
    max_members: int,
    max_uncompressed_bytes: int,
    limits: ExpansionLimits = UNBOUNDED_MEMBERS,
    preprocess_limits: PreprocessLimits = UNBOUNDED_PREPROCESS,
) -> CalibrationSetInfo:
    """Validate the upload at ``upload_path`` and write its stored form to ``dest_dir`` (must not exist).

    ``max_uncompressed_bytes`` bounds the whole set (bytes read out of an archive, and the stored
    arrays); ``limits`` bounds each archive member, ``preprocess_limits`` what images become. Raises
    InvalidCalibrationSet for malformed or unusable data, UnsafeArchive for archives with unsafe
    members, TooLarge past the bounds, Conflict when ``dest_dir`` exists at the start. When another
    writer places ``dest_dir`` while this one ingests (the same content: the directory is named by
    it), that copy is kept and this one dropped. On any error nothing is left in ``dest_dir``'s parent.
    """
    if dest_dir.exists():
        raise Conflict(f"A calibration set is already stored at {dest_dir}.")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest_dir.parent))
    try:
        kind = _detect_container(upload_path, filename)
        if kind == "npy":
            _require_no_preprocess(preprocess, "an .npy array")
            info = ingest_npy(upload_path, filename, build)
        elif kind == "zip" and is_npz(upload_path, filename, max_members, max_uncompressed_bytes, limits):
            _require_no_preprocess(preprocess, "an .npz archive")
            info = ingest_npz(upload_path, filename, build, max_members, max_uncompressed_bytes, limits)
        else:
            if preprocess is None:
                raise InvalidCalibrationSet(
                    "Image archives need a 'preprocess' JSON that says how images become model inputs, "
                    f"for example {_PREPROCESS_EXAMPLE}."
                )
            info = _ingest_images(
                upload_path,
                kind,
                filename,
                build,
                preprocess,
                max_members,
                max_uncompressed_bytes,
                limits,
                preprocess_limits,
            )
        (build / INFO_FILE).write_text(json.dumps(info.to_dict(), indent=1))
        for path in build.iterdir():
            _fsync(path)
        try:
            os.rename(build, dest_dir)
        except OSError:
            if not dest_dir.is_dir():
                raise
            # Another process placed the same content first: its stored form equals ours.
            shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _fsync(dest_dir.parent)  # make the rename itself durable
    return info


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


def _require_no_preprocess(preprocess: PreprocessSpec | None, what: str) -> None:
    if preprocess is not None:
        raise InvalidCalibrationSet(
            f"A 'preprocess' spec only applies to image archives, but the upload is {what}; "
            "send the arrays already preprocessed and drop the field."
        )


def _ingest_images(
    upload_path: Path,
    kind: ArchiveKind,
    filename: str,
    build: Path,
    spec: PreprocessSpec,
    max_members: int,
    max_bytes: int,
    limits: ExpansionLimits,
    preprocess_limits: PreprocessLimits,
) -> CalibrationSetInfo:
    listing = scan_archive(
        upload_path, kind, max_members=max_members, max_total_bytes=max_bytes, limits=limits
    )
    if not listing.images:
        examples = ", ".join(f"'{s.name}' ({s.reason})" for s in listing.skipped[:3])
        raise InvalidCalibrationSet(
            f"'{filename}' holds no PNG or JPEG images" + (f"; skipped {examples}" if examples else "") + ".",
            details={"skipped": [{"name": s.name, "reason": s.reason} for s in listing.skipped[:50]]},
        )
    count = len(listing.images)
    if spec.size is not None:  # the output size is known: refuse before decoding a single image
        shape = spec.sample_shape(*spec.size)
        preprocess_limits.check_sample(shape, spec.itemsize, "every image")
        preprocess_limits.check_set(count, shape, spec.itemsize)
    target: np.ndarray | None = None
    first_name = ""
    stats = StatsAccumulator(spec.channel_axis, spec.channels)
    for member in read_images(upload_path, listing, max_total_bytes=max_bytes, limits=limits):
        sample = image_to_array(member.data, spec, name=member.name, limits=preprocess_limits)
        if target is None:
            preprocess_limits.check_set(count, sample.shape, sample.dtype.itemsize)
            stored_bytes = count * sample.nbytes
            if stored_bytes > max_bytes:
                raise TooLarge(
                    f"{count} preprocessed images of shape {list(sample.shape)} ({sample.dtype}) take "
                    f"{stored_bytes} bytes, over the limit of {max_bytes}; send fewer images or pick a "
                    "smaller size."
                )
            target = np.lib.format.open_memmap(
                build / array_file(0), mode="w+", dtype=sample.dtype, shape=(count, *sample.shape)
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
    flush_array(target)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
