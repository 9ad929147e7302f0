"""Calibration sets: read a stored set in batches, split it, bind it to a model.

The stored form is a directory holding ``input_<i>.npy`` per input (C order, native byte order,
sample axis first, memory-mappable) and ``info.json`` (:class:`CalibrationSetInfo`, in
:mod:`service.datasets.set_info`); :func:`service.datasets.ingest.ingest_calibration_upload`
writes it from an upload. :meth:`CalibrationSet.batches` copies only the batch it yields, so memory
does not grow with the number of samples.

``.npy`` and image sets hold one unnamed input (stored as ``input``), as does an ``.npz`` whose only
array is numpy's positional ``arr_0``; an unnamed input binds to any single-input model. Binding
rules are in :func:`bind_to_model`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.datasets.set_info import INFO_FILE, CalibrationSetInfo, InputSummary, SetFormat, array_file
from service.errors import BadInput, InvalidCalibrationSet, NotFound

if TYPE_CHECKING:
    from service.onnx_graph.inspect import TensorSpec


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
        indices: Sequence[int] | None = None,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Samples ``start:stop`` (or the samples ``indices`` lists) in order, ``batch_size`` at a time
        (the last batch may be shorter).

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
        rows = np.arange(start, stop) if indices is None else np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.samples):
            raise BadInput(f"Sample indices must lie in [0, {self.samples}).")
        return self._batches(batch_size, rows, {key: positions[name] for key, name in binding.items()})

    def _batches(
        self, batch_size: int, rows: np.ndarray, sources: dict[str, int]
    ) -> Iterator[dict[str, np.ndarray]]:
        arrays = {key: self._memmap(index) for key, index in sources.items()}
        try:
            for first in range(0, rows.size, batch_size):
                chosen = rows[first : first + batch_size]
                contiguous = chosen.size and int(chosen[-1]) - int(chosen[0]) == chosen.size - 1
                yield {
                    key: np.array(
                        array[int(chosen[0]) : int(chosen[-1]) + 1] if contiguous else array[chosen]
                    )
                    for key, array in arrays.items()
                }
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

    def random_split(self, holdout_fraction: float, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(calibration samples, held-out samples) as sorted indices, the held-out ones drawn at random
        with ``seed`` (as many as :meth:`split` holds out), so no naming order biases the check."""
        _, held = self.split(holdout_fraction)
        chosen = np.random.default_rng(seed).permutation(self.samples)
        holdout = np.sort(chosen[: len(held)])
        rest = np.sort(chosen[len(held) :])
        return tuple(int(i) for i in rest), tuple(int(i) for i in holdout)

    def _memmap(self, index: int) -> np.ndarray:
        path = self.directory / array_file(index)
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
