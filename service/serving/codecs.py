"""Inference bodies on the wire: JSON, npz and raw tensor bytes, in and out.

Three request forms, chosen by ``Content-Type``:

* ``application/json``: ``{"inputs": {name: nested list}}``. Numbers decode to ``int64``/``float64``
  (``bool`` for true/false) and are cast to the engine's dtypes under the safe-cast policy of
  :mod:`service.serving.validation`. Answered as ``{"outputs": {name: nested list}, ...}``; a
  non-finite output is written as Python's ``NaN``/``Infinity`` tokens (use a binary form when the
  client's parser is strict).
* ``application/x-npz``: the bytes of ``numpy.savez`` (or ``savez_compressed``) with one array per
  input name. Read with pickles refused, members counted and size-checked against their headers
  before any array is allocated. Answered with ``numpy.savez`` bytes, one array per output name.
* ``application/x-numpy``: the raw C-order bytes of the only input of a single-input engine, with
  ``X-Tensor-Dtype`` (a numpy dtype name such as ``float32``; little-endian) and ``X-Tensor-Shape``
  (comma-separated ints, e.g. ``1,3,224,224``; empty for a scalar) headers and optionally
  ``X-Tensor-Name``. The array is a view of the request body (no copy). Answered the same way for a
  single-output engine, or for the output picked with ``?output=<name>``.

The response form follows ``Accept`` when it names one of the three types (first match wins;
quality values are not weighed), otherwise it is the request's form. Binary inputs are never cast.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from service.errors import BadInput, InvalidInferenceInput, TooLarge

WireFormat = Literal["json", "npz", "raw"]
JSON_MEDIA = "application/json"
NPZ_MEDIA = "application/x-npz"
RAW_MEDIA = "application/x-numpy"
MEDIA_TYPES: dict[WireFormat, str] = {"json": JSON_MEDIA, "npz": NPZ_MEDIA, "raw": RAW_MEDIA}
DTYPE_HEADER = "X-Tensor-Dtype"
SHAPE_HEADER = "X-Tensor-Shape"
NAME_HEADER = "X-Tensor-Name"
# An inference request is one batch of tensors, far below a model upload; this bounds what one
# request may make the server hold (a JSON body expands several-fold once parsed).
DEFAULT_MAX_INFERENCE_BYTES = 256 * 1024 * 1024
MAX_NPZ_MEMBERS = 256
# More axes than any vision model uses, and well under numpy's own limit of 64 (which would raise).
MAX_TENSOR_RANK = 32


@dataclass(frozen=True)
class EncodedOutputs:
    """A response body ready to send."""

    body: bytes
    media_type: str
    headers: tuple[tuple[str, str], ...] = ()


def request_format(content_type: str | None) -> WireFormat:
    """The wire format named by a Content-Type header (parameters such as charset ignored)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    for fmt, name in MEDIA_TYPES.items():
        if media == name:
            return fmt
    raise InvalidInferenceInput(
        f"Unsupported Content-Type '{content_type or ''}'. Send {JSON_MEDIA} "
        f'({{"inputs": {{name: list}}}}), '
        f"{NPZ_MEDIA} (numpy.savez bytes, one array per input) or {RAW_MEDIA} (raw tensor bytes with "
        f"{DTYPE_HEADER} and {SHAPE_HEADER} headers)."
    )


def response_format(accept: str | None, requested: WireFormat) -> WireFormat:
    """The first supported media type in ``Accept``, else the request's own format."""
    for part in (accept or "").split(","):
        media = part.split(";", 1)[0].strip().lower()
        for fmt, name in MEDIA_TYPES.items():
            if media == name:
                return fmt
    return requested


def decode_inputs(
    fmt: WireFormat, body: bytes, headers: Mapping[str, str], input_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Arrays by input name from a request body in ``fmt``; InvalidInferenceInput when malformed."""
    if fmt == "json":
        return decode_json(body)
    if fmt == "npz":
        return decode_npz(body)
    return decode_raw(body, headers, input_names)


def decode_json(body: bytes) -> dict[str, np.ndarray]:
    try:
        payload = json.loads(body)
    # ValueError also covers Python's limit on integer digits (4300), which JSONDecodeError does not.
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInferenceInput(f"The body is not valid JSON: {exc}.") from exc
    except RecursionError as exc:
        raise InvalidInferenceInput("The JSON body is nested too deeply to read.") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), dict):
        raise InvalidInferenceInput('The JSON body must be an object {"inputs": {input name: nested list}}.')
    unknown_keys = sorted(set(payload) - {"inputs"})
    if unknown_keys:
        raise InvalidInferenceInput(f"Unknown keys {unknown_keys} in the JSON body; only 'inputs' is read.")
    feeds: dict[str, np.ndarray] = {}
    for name, value in payload["inputs"].items():
        try:
            array = np.asarray(value)
        except RecursionError as exc:
            raise InvalidInferenceInput(f"Input '{name}' is nested too deeply to be a tensor.") from exc
        except ValueError as exc:  # ragged nesting
            raise InvalidInferenceInput(
                f"Input '{name}' is not a rectangular nested list (every row must have the same "
                f"length): {exc}"
            ) from exc
        if array.dtype.kind not in "biuf":
            raise InvalidInferenceInput(
                f"Input '{name}' must hold only numbers (or only true/false), with no nulls or strings."
            )
        feeds[name] = array
    return feeds


def decode_npz(body: bytes) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise InvalidInferenceInput(f"The body is not an npz archive (numpy.savez output): {exc}.") from exc
    with archive:
        members = archive.infolist()
        if len(members) > MAX_NPZ_MEMBERS:
            raise InvalidInferenceInput(
                f"The npz holds {len(members)} arrays; at most {MAX_NPZ_MEMBERS} are read."
            )
        declared = sum(member.file_size for member in members)
        if declared > DEFAULT_MAX_INFERENCE_BYTES:
            raise TooLarge(
                f"The npz expands to {declared} bytes, more than the {DEFAULT_MAX_INFERENCE_BYTES} bytes one "
                "inference request may hold; send smaller batches."
            )
        feeds: dict[str, np.ndarray] = {}
        for member in members:
            if not member.filename.endswith(".npy"):
                raise InvalidInferenceInput(
                    f"npz member '{member.filename}' is not an .npy array; build the body with numpy.savez."
                )
            name = member.filename[: -len(".npy")]
            if name in feeds:
                raise InvalidInferenceInput(f"The npz holds two arrays named '{name}'.")
            feeds[name] = _read_npy_member(archive, member, name)
    return feeds


def _read_npy_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, name: str) -> np.ndarray:
    """One .npy member, its header checked against its declared size before allocating."""
    fmt = np.lib.format
    try:
        with archive.open(member) as stream:
            version = fmt.read_magic(stream)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(stream)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            if dtype.hasobject or dtype.kind not in "biuf":
                raise InvalidInferenceInput(
                    f"Array '{name}' has dtype {dtype}; only numeric and bool arrays are accepted "
                    "(no pickles)."
                )
            check_shape(shape, f"Array '{name}'")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > member.file_size:
                raise ValueError(
                    f"its header declares {nbytes} bytes of data in a {member.file_size}-byte member"
                )
            data = stream.read(nbytes)
            if len(data) != nbytes:
                raise ValueError(f"it holds {len(data)} bytes of data, its header says {nbytes}")
    # RuntimeError: an encrypted member; NotImplementedError: a compression method zipfile lacks.
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as exc:
        raise InvalidInferenceInput(f"Array '{name}' in the npz cannot be read: {exc}.") from exc
    array = np.frombuffer(data, dtype=dtype)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def decode_raw(body: bytes, headers: Mapping[str, str], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The single input as a zero-copy view of ``body``, typed and shaped by the headers."""
    if len(input_names) != 1:
        raise InvalidInferenceInput(
            f"{RAW_MEDIA} carries one tensor, but this engine takes {len(input_names)} inputs "
            f"{list(input_names)}; send {NPZ_MEDIA} or {JSON_MEDIA} instead."
        )
    name = headers.get(NAME_HEADER) or input_names[0]
    dtype = parse_dtype_header(headers.get(DTYPE_HEADER))
    shape = parse_shape_header(headers.get(SHAPE_HEADER))
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(body):
        raise InvalidInferenceInput(
            f"The body holds {len(body)} bytes, but {dtype.name} with shape {list(shape)} needs {expected}."
        )
    return {name: np.frombuffer(body, dtype=dtype).reshape(shape)}


_DTYPE_NAME = re.compile(r"[<>=|]?[A-Za-z][A-Za-z0-9]{0,15}")


def parse_dtype_header(value: str | None) -> np.dtype:
    if not value:
        raise InvalidInferenceInput(f"{RAW_MEDIA} bodies need an {DTYPE_HEADER} header, e.g. 'float32'.")
    name = value.strip()
    try:
        # One plain dtype name only: numpy reads commas and parentheses as structured dtypes, and
        # raises ValueError (not TypeError) on malformed ones.
        if not _DTYPE_NAME.fullmatch(name):
            raise TypeError(name)
        dtype = np.dtype(name)
    except (TypeError, ValueError) as exc:
        raise InvalidInferenceInput(
            f"{DTYPE_HEADER} '{value}' is not a numpy dtype name such as 'float32'."
        ) from exc
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise InvalidInferenceInput(f"{DTYPE_HEADER} '{value}' is not a numeric or bool dtype.")
    if dtype.byteorder == ">":
        raise InvalidInferenceInput(f"{DTYPE_HEADER} '{value}' is big-endian; send little-endian bytes.")
    return dtype.newbyteorder("=")


def parse_shape_header(value: str | None) -> tuple[int, ...]:
    if value is None:
        raise InvalidInferenceInput(f"{RAW_MEDIA} bodies need an {SHAPE_HEADER} header, e.g. '1,3,224,224'.")
    text = value.strip().strip("[]()").strip()
    if not text:
        return ()
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError as exc:
        raise InvalidInferenceInput(
            f"{SHAPE_HEADER} '{value}' must be comma-separated whole numbers, e.g. '1,3,224,224'."
        ) from exc
    check_shape(dims, f"{SHAPE_HEADER} '{value}'")
    return dims


def check_shape(shape: Sequence[int], what: str) -> None:
    """Refuse a declared tensor shape with a negative dimension or more than MAX_TENSOR_RANK axes."""
    if len(shape) > MAX_TENSOR_RANK:
        raise InvalidInferenceInput(
            f"{what} has {len(shape)} dimensions; a tensor may have at most {MAX_TENSOR_RANK}."
        )
    if any(dim < 0 for dim in shape):
        raise InvalidInferenceInput(f"{what} has a negative dimension (shape {list(shape)}).")


def check_output_choice(fmt: WireFormat, output_names: Sequence[str], chosen: str | None) -> None:
    """Refuse, before any inference runs, a response the chosen format cannot carry."""
    if chosen is not None and chosen not in output_names:
        raise BadInput(
            f"output '{chosen}' is not an output of this engine; its outputs are {list(output_names)}."
        )
    if fmt == "raw" and chosen is None and len(output_names) != 1:
        raise BadInput(
            f"This engine has {len(output_names)} outputs {list(output_names)}; {RAW_MEDIA} carries one. "
            f"Pick one with ?output=<name>, or ask for Accept: {NPZ_MEDIA}."
        )


def encode_outputs(
    outputs: Mapping[str, np.ndarray],
    fmt: WireFormat,
    *,
    chosen: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> EncodedOutputs:
    """The response body for ``outputs`` (only ``chosen`` when given); ``metadata`` goes into JSON only."""
    selected = {chosen: outputs[chosen]} if chosen is not None else dict(outputs)
    if fmt == "json":
        body = {"outputs": {name: array.tolist() for name, array in selected.items()}, **(metadata or {})}
        return EncodedOutputs(json.dumps(body, separators=(",", ":")).encode(), JSON_MEDIA)
    if fmt == "npz":
        return EncodedOutputs(npz_bytes(selected), NPZ_MEDIA)
    ((name, array),) = selected.items()
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    headers = (
        (DTYPE_HEADER, array.dtype.name),
        (SHAPE_HEADER, ",".join(str(dim) for dim in array.shape)),
        (NAME_HEADER, name),
    )
    return EncodedOutputs(array.tobytes(), RAW_MEDIA, headers)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """What ``numpy.savez`` writes (an uncompressed zip of .npy members), without pickles."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()
