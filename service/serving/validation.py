"""Inference inputs checked against a runner's input specs before anything runs.

``validate_feeds(feeds, specs, allow_safe_casts=...)`` returns the arrays to hand to
``Runner.infer``, keyed and ordered like the specs, or raises :class:`InvalidInferenceInput` with a
message that names the input, the axis and what the engine accepts. Checks, in order: missing and
unexpected names, dtype, rank, fixed dims, dynamic dims within the engine's optimization profile
when the runner knows it, and one symbolic dim (``N``) meaning one size across all inputs.

Dtype policy. JSON has no dtypes: nested lists decode to ``int64``, ``float64`` or ``bool``, so for
JSON bodies (``allow_safe_casts=True``) a value is cast to the engine's dtype when the cast keeps its
kind and its range: ``float64``/``int64`` to any float dtype (rounding to the target precision is
expected; a value the target cannot hold, such as 1e39 for ``float32``, is refused), ``int64`` to a
narrower integer dtype when every value fits, ``bool`` only to ``bool``. Binary bodies (npz, raw
tensor bytes) declare their dtype explicitly, and a mismatch there is almost always a client bug
(``float64`` doubling the transfer, ``uint8`` pixels sent to a model that expects normalised
``float32``), so binary inputs must match exactly and are never cast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from service.backends.base import IOSpec
from service.errors import InvalidInferenceInput

# Symbols that ONNX exporters and ONNX Runtime use for "unknown", which carry no cross-input meaning.
_ANONYMOUS_DIMS = frozenset({"", "?", "None", "-1"})


def describe_spec(spec: IOSpec) -> str:
    """``'input' float32 [N, 3, 224, 224]`` (with the profile range when known)."""
    dims = ", ".join(str(dim) for dim in spec.shape)
    text = f"'{spec.name}' {spec.dtype} [{dims}]"
    if spec.profile is not None:
        text += f" (profile min {list(spec.profile.min)}, max {list(spec.profile.max)})"
    return text


def validate_feeds(
    feeds: Mapping[str, np.ndarray], specs: Sequence[IOSpec], *, allow_safe_casts: bool = False
) -> dict[str, np.ndarray]:
    """The feeds, cast where the policy allows and C-contiguous, in spec order; or InvalidInferenceInput."""
    _check_names(feeds, specs)
    checked: dict[str, np.ndarray] = {}
    symbols: dict[str, tuple[int, str, int]] = {}
    for spec in specs:
        array = _with_dtype(feeds[spec.name], spec, allow_safe_casts)
        _check_shape(array, spec, symbols)
        checked[spec.name] = np.ascontiguousarray(array)
    return checked


def _check_names(feeds: Mapping[str, np.ndarray], specs: Sequence[IOSpec]) -> None:
    expected = [spec.name for spec in specs]
    missing = [name for name in expected if name not in feeds]
    extra = sorted(set(feeds) - set(expected))
    if not missing and not extra:
        return
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    takes = "; ".join(describe_spec(spec) for spec in specs)
    raise InvalidInferenceInput(
        f"The inputs do not match the engine's: {', '.join(parts)}. The engine takes {takes}.",
        details={"missing": missing, "unexpected": extra, "expected": expected},
    )


def _with_dtype(array: np.ndarray, spec: IOSpec, allow_safe_casts: bool) -> np.ndarray:
    target = np.dtype(spec.dtype)
    if array.dtype == target:
        return array
    if array.dtype.byteorder == ">" and array.dtype.newbyteorder("=") == target:
        return array.astype(target)  # same values, other byte order: a lossless conversion
    if not allow_safe_casts:
        raise InvalidInferenceInput(
            f"Input '{spec.name}' is {array.dtype.name}, but the engine expects {target.name}. Binary "
            f"inputs are never cast: convert it on the client (e.g. array.astype('{target.name}'))."
        )
    source_kind, target_kind = array.dtype.kind, target.kind
    if target_kind == "f" and source_kind in "iuf":
        return _float_cast(array, target, spec.name)
    if target_kind in "iu" and source_kind in "iu":
        return _int_cast(array, target, spec.name)
    if target_kind == "b" and source_kind == "b":
        return array
    got = (
        "true/false values"
        if source_kind == "b"
        else "floating-point numbers"
        if source_kind == "f"
        else ("integers" if source_kind in "iu" else f"{array.dtype.name} values")
    )
    raise InvalidInferenceInput(
        f"Input '{spec.name}' holds {got}, which cannot be cast safely to the engine's {target.name}."
        + (" Send whole numbers." if target_kind in "iu" and source_kind == "f" else "")
    )


def _float_cast(array: np.ndarray, target: np.dtype, name: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is detected below and reported with the value
        cast = array.astype(target)
    # A finite value that became infinite did not fit the target's range.
    overflow = np.isinf(cast) & np.isfinite(array)
    if overflow.any():
        index = tuple(int(i) for i in np.argwhere(overflow)[0])
        raise InvalidInferenceInput(
            f"Input '{name}' value {array[index]!r} at index {list(index)} is outside the range of "
            f"{target.name} (largest finite value {np.finfo(target).max!r})."
        )
    return cast


def _int_cast(array: np.ndarray, target: np.dtype, name: str) -> np.ndarray:
    info = np.iinfo(target)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise InvalidInferenceInput(
            f"Input '{name}' has values from {array.min()} to {array.max()}, outside the range of "
            f"{target.name} ({info.min} to {info.max})."
        )
    return array.astype(target)


def _check_shape(array: np.ndarray, spec: IOSpec, symbols: dict[str, tuple[int, str, int]]) -> None:
    expected = "[" + ", ".join(str(dim) for dim in spec.shape) + "]"
    if array.ndim != len(spec.shape):
        raise InvalidInferenceInput(
            f"Input '{spec.name}' has rank {array.ndim} (shape {list(array.shape)}), but the engine "
            f"expects rank {len(spec.shape)}: {expected}."
        )
    for axis, (size, dim) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if size == 0:
            raise InvalidInferenceInput(
                f"Input '{spec.name}' is empty along axis {axis} (shape {list(array.shape)}); send at least "
                "one element per axis."
            )
        if isinstance(dim, int) and dim >= 0:
            if size != dim:
                raise InvalidInferenceInput(
                    f"Input '{spec.name}' has shape {list(array.shape)}, but the engine expects {expected}: "
                    f"axis {axis} is fixed at {dim}, got {size}."
                )
            continue
        if spec.profile is not None:
            low, high = spec.profile.min[axis], spec.profile.max[axis]
            if not low <= size <= high:
                raise InvalidInferenceInput(
                    f"Input '{spec.name}' has size {size} on axis {axis} (shape {list(array.shape)}), "
                    "outside "
                    f"the engine's optimization profile {low}..{high} for that axis; send a size in range "
                    "or build an engine with a wider shape range."
                )
        symbol = str(dim)
        if symbol in _ANONYMOUS_DIMS or symbol.startswith("unk__"):
            continue
        seen = symbols.get(symbol)
        if seen is None:
            symbols[symbol] = (size, spec.name, axis)
        elif seen[0] != size:
            raise InvalidInferenceInput(
                f"Dimension '{symbol}' must be one size across inputs, but input '{seen[1]}' axis {seen[2]} "
                f"has {seen[0]} and input '{spec.name}' axis {axis} has {size}."
            )
