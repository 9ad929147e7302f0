"""Inference inputs from files: ``.npy``, ``.npz`` and images, fitted to an engine's declared inputs.

Contract: :func:`load_inputs` turns the ``--input [NAME=]PATH`` arguments of ``engine-service
infer`` into one array per model input:

- ``.npz``: every array by its name (a lone unnamed ``arr_0`` goes to a single-input model);
- ``.npy``: one array, for ``NAME`` or the model's only input;
- ``.png``/``.jpg``/``.jpeg``: decoded and preprocessed exactly as calibration images are
  (:func:`service.datasets.preprocess.image_to_array` with a
  :class:`~service.datasets.preprocess.PreprocessSpec`); several images for one input are
  stacked into a batch. Without ``--preprocess`` the spec is derived from the input's static shape
  (NCHW or NHWC, its height and width, 1/255 scaling).

Arrays one axis short of the input's rank get a batch axis of 1; floating-point arrays are cast to
the input's floating dtype (the server never casts binary inputs). Everything else is sent as it is,
and the server says what does not fit. Problems with the files raise :class:`BadInput`.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import BadInput

if TYPE_CHECKING:
    import numpy as np

    from service.datasets.preprocess import PreprocessSpec

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
ARRAY_SUFFIXES = frozenset({".npy", ".npz"})


@dataclass(frozen=True)
class InputSpec:
    """One declared model input, as the server describes it (dims are ints or symbolic names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> InputSpec:
        return cls(name=str(document["name"]), dtype=str(document["dtype"]), shape=tuple(document["shape"]))


@dataclass(frozen=True)
class InputFile:
    """One ``--input`` argument: a file, and the input it is for when named."""

    path: Path
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> InputFile:
        """``PATH`` or ``NAME=PATH`` (an existing path containing '=' stays a path)."""
        name, sep, rest = text.partition("=")
        if sep and name and rest and not Path(text).exists():
            return cls(path=Path(rest), name=name)
        return cls(path=Path(text))


def preprocess_text(value: str | None) -> str | None:
    """A ``--preprocess`` value as JSON text: given inline, or read from ``@file.json``."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"Cannot read the preprocessing spec file {path}: {exc.strerror or exc}.") from exc


def parse_preprocess(value: str | None) -> PreprocessSpec | None:
    """A PreprocessSpec from ``--preprocess`` (JSON or ``@file``), with the server's error wording."""
    from pydantic import ValidationError

    from service.datasets.preprocess import PreprocessSpec

    text = preprocess_text(value)
    if not text:
        return None
    try:
        return PreprocessSpec.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise BadInput(f"--preprocess is not valid JSON: {exc}.") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
        raise BadInput(f"--preprocess is invalid: {problems}.") from exc


def default_preprocess(spec: InputSpec) -> PreprocessSpec:
    """The spec that feeds an image to ``spec`` as is: its layout, height and width, scaled by 1/255."""
    from service.datasets.preprocess import PreprocessSpec

    shape = spec.shape
    if len(shape) == 4 and shape[1] in (1, 3):  # channels right after the batch axis
        layout, channels, height, width = "NCHW", shape[1], shape[2], shape[3]
    elif len(shape) == 4 and shape[3] in (1, 3):  # channels last
        layout, channels, height, width = "NHWC", shape[3], shape[1], shape[2]
    else:
        layout, channels, height, width = "", 0, "?", "?"
    if not (layout and isinstance(height, int) and isinstance(width, int)):
        raise BadInput(
            f"Input '{spec.name}' has shape {list(shape)}, so the image preprocessing cannot be derived "
            'from it; pass --preprocess \'{"size": [H, W], "layout": "NCHW", ...}\'.'
        )
    dtype = spec.dtype if spec.dtype in ("float32", "float16", "uint8") else "float32"
    return PreprocessSpec.model_validate(
        {"size": [height, width], "layout": layout, "channels": channels, "dtype": dtype}
    )


def load_inputs(
    files: Sequence[InputFile], specs: Sequence[InputSpec], preprocess: PreprocessSpec | None
) -> dict[str, np.ndarray]:
    """One array per model input from ``files`` (see the module docstring)."""
    if not files:
        raise BadInput("Give at least one --input file (.npy, .npz, .png or .jpg).")
    by_name = {spec.name: spec for spec in specs}
    arrays: dict[str, np.ndarray] = {}
    images: dict[str, list[np.ndarray]] = {}
    for file in files:
        suffix = file.path.suffix.lower()
        if suffix not in ARRAY_SUFFIXES | IMAGE_SUFFIXES:
            raise BadInput(f"--input {file.path}: use a .npy, .npz, .png or .jpg file.")
        if not file.path.is_file():
            raise BadInput(f"--input {file.path}: no such file.")
        if suffix == ".npz":
            loaded = _read_npz(file.path)
            if file.name is not None:
                raise BadInput(
                    f"--input {file.name}={file.path}: an .npz names its own inputs; drop '{file.name}='."
                )
            if list(loaded) == ["arr_0"] and len(specs) == 1:
                loaded = {specs[0].name: loaded["arr_0"]}
            for name, array in loaded.items():
                _put(arrays, _target(name, by_name, file), array, str(file.path))
            continue
        name = _target(file.name, by_name, file)
        if suffix == ".npy":
            _put(arrays, name, _read_npy(file.path), str(file.path))
        else:
            images.setdefault(name, []).append(
                _read_image(file.path, preprocess or default_preprocess(by_name[name]))
            )
    for name, samples in images.items():
        _put(arrays, name, _batch_of_images(name, samples), f"{len(samples)} image(s)")
    return {name: _fitted(array, by_name[name]) for name, array in arrays.items()}


def _target(name: str | None, by_name: dict[str, InputSpec], file: InputFile) -> str:
    if name is None:
        if len(by_name) != 1:
            raise BadInput(
                f"--input {file.path}: the engine has inputs {sorted(by_name)}; "
                f"say which one with --input NAME={file.path}."
            )
        return next(iter(by_name))
    if name not in by_name:
        raise BadInput(f"--input {file.path}: the engine has no input '{name}' (it has {sorted(by_name)}).")
    return name


def _put(arrays: dict[str, np.ndarray], name: str, array: np.ndarray, source: str) -> None:
    if name in arrays:
        raise BadInput(f"Input '{name}' is given twice (again by {source}); give each input once.")
    arrays[name] = array


def _batch_of_images(name: str, samples: list[np.ndarray]) -> np.ndarray:
    import numpy as np

    shapes = sorted({sample.shape for sample in samples})
    if len(shapes) > 1:
        raise BadInput(
            f"The images for input '{name}' decode to different shapes {shapes}; "
            "resize them to one size with --preprocess '{\"size\": [H, W]}'."
        )
    return np.stack(samples)


def _read_npy(path: Path) -> np.ndarray:
    import numpy as np

    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (ValueError, OSError, EOFError) as exc:
        raise BadInput(f"--input {path} is not a readable .npy array without pickles: {exc}.") from exc


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: np.asarray(archive[name]) for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"--input {path} is not a readable .npz archive without pickles: {exc}.") from exc


def _read_image(path: Path, spec: PreprocessSpec) -> np.ndarray:
    from service.datasets.preprocess import image_to_array

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput(f"Cannot read --input {path}: {exc.strerror or exc}.") from exc
    return image_to_array(data, spec, name=str(path))


def _fitted(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    import numpy as np

    if array.ndim == len(spec.shape) - 1:
        array = array[np.newaxis, ...]  # one sample given: make it a batch of one
    try:
        target = np.dtype(spec.dtype)
    except TypeError:
        return array
    if array.dtype != target and array.dtype.kind == "f" and target.kind == "f":
        array = array.astype(target)
    return np.ascontiguousarray(array)
