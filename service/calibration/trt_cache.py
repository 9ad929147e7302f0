"""TensorRT calibration cache: the text ``IInt8Calibrator.read_calibration_cache`` returns.

Format (as TensorRT writes and reads it)::

    TRT-<version code>-<algorithm>
    <tensor name>: <hex digits>
    ...

The version code is TensorRT's ``NV_TENSORRT_VERSION``: ``major*10000 + minor*100 + patch`` from
TensorRT 10 on (10.1.0 -> ``100100``), ``major*1000 + minor*100 + patch`` before (8.6.1 -> ``8601``).
The algorithm is ``EntropyCalibration2`` for ``IInt8EntropyCalibrator2``. Each hex value is the
IEEE-754 bit pattern of the float32 scale, ``scale = amax / 127`` (1.0 -> ``3f800000``), written the
way TensorRT writes it: lowercase and without leading zeros, so a zero scale is ``0``. TensorRT also
writes infinity (``7f800000``) and negative values for some tensors; they are read and written back
bit for bit (a cache TensorRT wrote round-trips unchanged), but they carry no INT8 range:
:meth:`CalibrationCache.thresholds` leaves every tensor whose scale is not finite and positive out
(listed by :meth:`CalibrationCache.unusable`), so a consumer keeps those tensors out of INT8 and never
sees an infinite or zero amax. NaN is rejected.

TensorRT compares the header with the calibrator it is running: a cache written for another version
or algorithm is rejected ("Calibration table does not match calibrator algorithm type") and it falls
back to calibrating, so the header must name the TensorRT that reads it; ``with_trt_version``
re-heads a cache without touching its scales. Tensor names may contain spaces and colons
(``(Unnamed Layer* 4) [Shuffle]_output``, ``input:0``): a line splits at its last colon.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from service.errors import BadInput

DEFAULT_TRT_VERSION = "10.1.0"
DEFAULT_ALGORITHM = "EntropyCalibration2"
ALGORITHMS = frozenset(
    {"EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration"}
)

_HEADER = re.compile(r"TRT-(\d+)-([A-Za-z0-9_]+)")
_HEX_SCALE = re.compile(r"[0-9A-Fa-f]{1,8}")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*(?:[.+-].*)?")


@dataclass(frozen=True)
class CalibrationCache:
    """A parsed cache: ``version_code`` as in the header (e.g. ``"100100"``), algorithm, scales."""

    version_code: str
    algorithm: str
    scales: Mapping[str, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", MappingProxyType(dict(self.scales)))

    def thresholds(self) -> dict[str, float]:
        """amax per tensor (``scale * 127``), for the tensors with a finite, positive scale only."""
        return {name: scale * 127.0 for name, scale in self.scales.items() if _usable(scale)}

    def unusable(self) -> tuple[str, ...]:
        """Tensors whose scale is zero, negative or infinite: no INT8 range, keep them out of INT8."""
        return tuple(name for name, scale in self.scales.items() if not _usable(scale))


def trt_version_code(version: str) -> str:
    """TensorRT's ``NV_TENSORRT_VERSION`` for a version string such as ``tensorrt.__version__``."""
    match = _VERSION.fullmatch(version.strip())
    if match is None:
        raise BadInput(f"'{version}' is not a TensorRT version; expected something like '10.1.0'.")
    major, minor, patch = int(match[1]), int(match[2]), int(match[3] or 0)
    if minor > 99 or patch > 99:
        raise BadInput(f"TensorRT version '{version}' has a component above 99, which no release uses.")
    # TensorRT 10 widened the major field (NvInferVersion.h): 10.1.0 is 100100, 8.6.1 was 8601.
    code = major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch
    return str(code)


def calibration_cache_from_scales(
    scales: Mapping[str, float],
    *,
    trt_version: str = DEFAULT_TRT_VERSION,
    algorithm: str = DEFAULT_ALGORITHM,
) -> bytes:
    """The cache text for per-tensor scales, one line per tensor in the mapping's order.

    ``trt_version`` is the TensorRT that will read the cache (``tensorrt.__version__``). A scale may
    be anything TensorRT itself writes (infinity, zero, negative) but not NaN, and must fit a float32
    without a non-zero value rounding to zero; names must be non-empty and free of line breaks.
    """
    if algorithm not in ALGORITHMS:
        raise BadInput(f"Unknown calibration algorithm '{algorithm}'; TensorRT knows {sorted(ALGORITHMS)}.")
    lines = [f"TRT-{trt_version_code(trt_version)}-{algorithm}"]
    for name, scale in scales.items():
        if not name or name.splitlines() != [name]:  # one name, one line: no line breaks of any kind
            raise BadInput(f"Tensor name {name!r} cannot be written to a calibration cache line.")
        if math.isnan(scale):
            raise BadInput(f"The scale of tensor '{name}' is NaN; a calibration cache needs a number.")
        lines.append(f"{name}: {_hex_from_scale(scale, name)}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def scales_from_calibration_cache(data: bytes) -> CalibrationCache:
    """Parse cache bytes; BadInput names the first line that is not in TensorRT's format."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"The calibration cache is not UTF-8 text: {exc}.") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline (or a few) is how TensorRT ends the file
    if not lines:
        raise BadInput("The calibration cache is empty; expected a 'TRT-<version>-<algorithm>' header line.")
    header = _HEADER.fullmatch(lines[0].strip())
    if header is None:
        raise BadInput(
            f"Line 1 of the calibration cache is {lines[0][:80]!r}; expected a header such as "
            "'TRT-100100-EntropyCalibration2'."
        )
    scales: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        name, scale = _parse_line(line, number)
        if name in scales:
            raise BadInput(f"Line {number} of the calibration cache repeats tensor '{name}'.")
        scales[name] = scale
    return CalibrationCache(version_code=header[1], algorithm=header[2], scales=scales)


def with_trt_version(data: bytes, trt_version: str) -> bytes:
    """The same cache (algorithm and scales, bit for bit) with the header of ``trt_version``."""
    cache = scales_from_calibration_cache(data)
    return calibration_cache_from_scales(cache.scales, trt_version=trt_version, algorithm=cache.algorithm)


def _parse_line(line: str, number: int) -> tuple[str, float]:
    name, colon, value = line.rstrip().rpartition(":")
    value = value.strip()
    if not colon or not name or _HEX_SCALE.fullmatch(value) is None:
        raise BadInput(
            f"Line {number} of the calibration cache is {line[:80]!r}; expected '<tensor name>: <1 to 8 "
            "hex digits>' such as 'input: 3c010204'."
        )
    (scale,) = struct.unpack(">f", int(value, 16).to_bytes(4, "big"))
    if math.isnan(scale):
        raise BadInput(f"Line {number} of the calibration cache gives tensor '{name}' the scale nan.")
    return name, float(scale)


def _usable(scale: float) -> bool:
    return math.isfinite(scale) and scale > 0.0


def _hex_from_scale(scale: float, name: str) -> str:
    try:
        packed = struct.pack(">f", scale)
    except OverflowError as exc:
        raise BadInput(f"The scale of tensor '{name}' ({scale!r}) does not fit a float32.") from exc
    if scale != 0.0 and struct.unpack(">f", packed)[0] == 0.0:
        raise BadInput(f"The scale of tensor '{name}' ({scale!r}) rounds to zero in float32.")
    return format(int.from_bytes(packed, "big"), "x")  # as TensorRT writes it: no leading zeros
