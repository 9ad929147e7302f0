"""Calibration-set intake: every upload format, stored form, stats, batches, split, model binding.

Data comes from numpy arrays built here and real photos from ``skimage.data``; models from
``tests.model_factory`` run through a real ONNX Runtime session.
"""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import skimage.data
from PIL import Image

from service.datasets.ingest import ingest_calibration_upload
from service.datasets.preprocess import PreprocessSpec, image_to_array
from service.datasets.set_info import CalibrationSetInfo, ChannelStats, InputSummary, SetFormat
from service.datasets.storage import CalibrationSet, bind_to_model
from service.errors import BadInput, Conflict, InvalidCalibrationSet, NotFound, TooLarge, UnsafeArchive
from service.onnx_graph.inspect import TensorSpec, model_inputs
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder

MIB = 1024 * 1024
RNG = np.random.default_rng(7)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# Deliberately not in name order: the stored order must follow the names, not the archive.
PHOTOS = {
    "set/2_coffee.jpg": encode(skimage.data.coffee(), "JPEG"),
    "set/0_astronaut.png": encode(skimage.data.astronaut(), "PNG"),
    "set/3_camera.png": encode(skimage.data.camera(), "PNG"),
    "set/1_chelsea.jpeg": encode(skimage.data.chelsea(), "JPEG"),
}
SPEC = PreprocessSpec.model_validate(
    {
        "size": [48, 64],
        "resize": "letterbox",
        "pad_value": 114,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
)


def sets_dir(tmp_path: Path) -> Path:
    return tmp_path / "sets"


def ingest(
    tmp_path: Path,
    upload: Path,
    filename: str | None = None,
    *,
    preprocess: PreprocessSpec | None = None,
    max_members: int = 100,
    max_bytes: int = 256 * MIB,
) -> CalibrationSetInfo:
    return ingest_calibration_upload(
        upload,
        filename or upload.name,
        sets_dir(tmp_path) / "one",
        preprocess=preprocess,
        max_members=max_members,
        max_uncompressed_bytes=max_bytes,
    )


def stored(tmp_path: Path) -> CalibrationSet:
    return CalibrationSet.open(sets_dir(tmp_path) / "one")


def write_images(path: Path, members: dict[str, bytes]) -> Path:
    if path.suffix in (".zip", ".npz"):
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        return path
    mode = "w:gz" if path.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def read_all(calibration_set: CalibrationSet) -> dict[str, np.ndarray]:
    return next(calibration_set.batches(calibration_set.samples))


# --- formats -----------------------------------------------------------------------------------


def test_npz_stores_every_named_array_exactly_with_stats(tmp_path: Path) -> None:
    images = RNG.standard_normal((12, 3, 8, 8)).astype(np.float32) * [[[2.0]], [[1.0]], [[0.5]]]
    ids = RNG.integers(0, 1000, (12, 5)).astype(np.int64)
    np.savez_compressed(tmp_path / "set.npz", images=images.astype(np.float32), token_ids=ids)
    info = ingest(tmp_path, tmp_path / "set.npz")

    assert (info.format, info.samples, info.source_filename) == ("npz", 12, "set.npz")
    assert [(i.name, i.named, i.shape, i.dtype) for i in info.inputs] == [
        ("images", True, (3, 8, 8), "float32"),
        ("token_ids", True, (5,), "int64"),
    ]
    stats = info.inputs[0].stats
    assert stats.axis == 1
    np.testing.assert_allclose(stats.mean, images.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, images.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_array_equal(stats.min, images.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(stats.max, images.max(axis=(0, 2, 3)))
    whole = info.inputs[1].stats
    assert whole.axis is None
    assert whole.mean == pytest.approx((ids.mean(),)) and whole.std == pytest.approx((ids.std(),))

    data = read_all(stored(tmp_path))
    np.testing.assert_array_equal(data["images"], images)
    np.testing.assert_array_equal(data["token_ids"], ids)


def test_npy_is_one_unnamed_input_normalized_to_native_c_order(tmp_path: Path) -> None:
    samples = RNG.standard_normal((9, 4, 6)).astype(np.float32)
    np.save(tmp_path / "set.npy", np.asfortranarray(samples).astype(">f4"))
    info = ingest(tmp_path, tmp_path / "set.npy")

    assert (info.format, info.samples) == ("npy", 9)
    assert [(i.name, i.named, i.shape, i.dtype) for i in info.inputs] == [("input", False, (4, 6), "float32")]
    array = np.load(sets_dir(tmp_path) / "one" / "input_0.npy", mmap_mode="r")
    assert array.flags.c_contiguous and array.dtype.isnative
    np.testing.assert_array_equal(read_all(stored(tmp_path))["input"], samples)


def test_npz_fortran_ordered_member_is_copied_in_sample_order(tmp_path: Path) -> None:
    samples = RNG.standard_normal((5, 3, 7)).astype(np.float32)
    np.savez(tmp_path / "set.npz", x=np.asfortranarray(samples))
    ingest(tmp_path, tmp_path / "set.npz")
    np.testing.assert_array_equal(read_all(stored(tmp_path))["x"], samples)
    assert sorted(p.name for p in (sets_dir(tmp_path) / "one").iterdir()) == ["info.json", "input_0.npy"]


def test_positional_npz_array_is_unnamed_and_binds_to_any_single_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "set.npz", RNG.standard_normal((2, 3, 16, 16)).astype(np.float32))
    info = ingest(tmp_path, tmp_path / "set.npz")
    assert info.inputs[0].name == "arr_0" and not info.inputs[0].named
    assert bind_to_model(info, [TensorSpec("pixels", "float32", ("N", 3, 16, 16))]) == {"pixels": "arr_0"}


def test_format_comes_from_content_not_the_filename(tmp_path: Path) -> None:
    np.savez(tmp_path / "upload.bin", a=np.ones((2, 2), np.float32))
    assert ingest(tmp_path, tmp_path / "upload.bin.npz", "calibration.tmp").format == "npz"


@pytest.mark.parametrize("archive_name", ["photos.zip", "photos.tar", "photos.tar.gz", "photos.tgz"])
def test_image_archive_of_real_photos_is_preprocessed_in_name_order(
    tmp_path: Path, archive_name: str
) -> None:
    upload = write_images(tmp_path / archive_name, {**PHOTOS, "set/README.txt": b"four photos"})
    info = ingest(tmp_path, upload, preprocess=SPEC)

    assert (info.format, info.samples, info.preprocess) == ("images", 4, SPEC)
    assert [(i.name, i.named, i.shape, i.dtype) for i in info.inputs] == [
        ("input", False, (3, 48, 64), "float32")
    ]
    assert [(s.name, s.reason) for s in info.skipped] == [
        ("set/README.txt", "not a .png, .jpg or .jpeg file")
    ]
    assert info.skipped_count == 1
    expected = np.stack([image_to_array(PHOTOS[name], SPEC) for name in sorted(PHOTOS)])
    data = read_all(stored(tmp_path))["input"]
    np.testing.assert_array_equal(data, expected)
    stats = info.inputs[0].stats
    assert stats.axis == 1
    np.testing.assert_allclose(stats.mean, expected.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)
    np.testing.assert_allclose(stats.std, expected.std(axis=(0, 2, 3), dtype=np.float64), rtol=1e-6)


def test_nhwc_uint8_image_stats_are_per_last_axis(tmp_path: Path) -> None:
    spec = PreprocessSpec(size=(32, 32), layout="NHWC", dtype="uint8", channel_order="BGR")
    info = ingest(tmp_path, write_images(tmp_path / "p.zip", PHOTOS), preprocess=spec)
    data = read_all(stored(tmp_path))["input"]
    assert data.shape == (4, 32, 32, 3) and data.dtype == np.uint8
    assert info.inputs[0].stats.axis == 3
    np.testing.assert_allclose(info.inputs[0].stats.mean, data.mean(axis=(0, 1, 2)), rtol=1e-9)
    assert info.inputs[0].stats.max == tuple(float(v) for v in data.max(axis=(0, 1, 2)))


def test_images_of_one_size_need_no_resize(tmp_path: Path) -> None:
    tiles = {
        f"t{i}.png": encode(skimage.data.astronaut()[i * 64 : i * 64 + 64, :64], "PNG") for i in range(3)
    }
    info = ingest(tmp_path, write_images(tmp_path / "t.zip", tiles), preprocess=PreprocessSpec(dtype="uint8"))
    assert info.inputs[0].shape == (3, 64, 64)
    np.testing.assert_array_equal(
        read_all(stored(tmp_path))["input"][2], skimage.data.astronaut()[128:192, :64].transpose(2, 0, 1)
    )


# --- errors, and nothing left behind ------------------------------------------------------------


def _npz(**arrays: Any) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        np.savez(tmp_path / "bad.npz", **arrays)
        return tmp_path / "bad.npz"

    return build


def _npy(array: np.ndarray, *, keep: float = 1.0) -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        np.save(tmp_path / "bad.npy", array)
        data = (tmp_path / "bad.npy").read_bytes()
        (tmp_path / "bad.npy").write_bytes(data[: int(len(data) * keep)])
        return tmp_path / "bad.npy"

    return build


def _raw(data: bytes, name: str = "bad.bin") -> Callable[[Path], Path]:
    def build(tmp_path: Path) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    return build


def _images(members: dict[str, bytes], name: str = "bad.zip") -> Callable[[Path], Path]:
    return lambda tmp_path: write_images(tmp_path / name, members)


_NAN = np.ones((4, 3), np.float32)
_NAN[2, 1] = np.nan
_BROKEN_JPEG = PHOTOS["set/2_coffee.jpg"][:2000]

BAD_UPLOADS: list[tuple[str, Callable[[Path], Path], PreprocessSpec | None, str]] = [
    ("object array", _npz(a=np.array([np.zeros(2), np.zeros(3)], dtype=object)), None, "object array.*Stack"),
    (
        "ragged sample counts",
        _npz(a=np.ones((3, 2)), b=np.ones((4, 2))),
        None,
        r"same number of samples.*'a': 3, 'b': 4",
    ),
    ("nan", _npz(x=_NAN), None, "NaN or infinite values \\(first at sample 2\\)"),
    ("inf", _npy(np.array([1.0, np.inf])), None, "first at sample 1"),
    ("no samples", _npy(np.zeros((0, 3), np.float32)), None, "empty \\(0 samples\\)"),
    ("scalar", _npy(np.array(1.0, np.float32)), None, "is a scalar"),
    ("zero-sized axis", _npy(np.zeros((3, 0), np.float32)), None, "zero-sized axis"),
    ("complex", _npy(np.ones(3, np.complex64)), None, "dtype complex64.*must be numeric"),
    ("strings", _npy(np.array(["a", "b"])), None, "dtype <U1"),
    ("truncated npy", _npy(np.ones((100, 10), np.float32), keep=0.5), None, "is truncated"),
    (
        "preprocess for npy",
        _npy(np.ones((2, 2), np.float32)),
        SPEC,
        "only applies to image archives.*an .npy",
    ),
    (
        "preprocess for npz",
        _npz(a=np.ones((2, 2), np.float32)),
        SPEC,
        "only applies to image archives.*an .npz",
    ),
    ("images without preprocess", _images(PHOTOS), None, "need a 'preprocess' JSON"),
    (
        "differing sizes",
        _images(PHOTOS),
        PreprocessSpec(),
        "Images differ in size: 'set/.*' gives \\d+x\\d+ but 'set/.*' gives \\d+x\\d+; add \"size\"",
    ),
    (
        "npz name, other members",
        _images({"a.npy": b"1", "notes.txt": b"x"}, "x.npz"),
        None,
        "named like an .npz",
    ),
    ("no images", _images({"notes.txt": b"x"}), SPEC, "holds no PNG or JPEG images; skipped 'notes.txt'"),
    (
        "broken image",
        _images({**PHOTOS, "set/9_broken.jpg": _BROKEN_JPEG}),
        SPEC,
        "'set/9_broken.jpg' cannot be decoded",
    ),
    ("random bytes", _raw(b"\x00\x01garbage" * 100), None, "'bad.bin' is not a recognised calibration set"),
    ("empty file", _raw(b""), None, "The upload is empty"),
]


@pytest.mark.parametrize(
    ("build", "preprocess", "message"),
    [case[1:] for case in BAD_UPLOADS],
    ids=[case[0] for case in BAD_UPLOADS],
)
def test_invalid_uploads_are_rejected_and_leave_nothing_behind(
    tmp_path: Path, build: Callable[[Path], Path], preprocess: PreprocessSpec | None, message: str
) -> None:
    upload = build(tmp_path)
    with pytest.raises(InvalidCalibrationSet, match=message):
        ingest(tmp_path, upload, preprocess=preprocess)
    assert list(sets_dir(tmp_path).iterdir()) == []


def test_unsafe_archive_is_rejected_and_leaves_nothing_behind(tmp_path: Path) -> None:
    upload = write_images(tmp_path / "evil.tar.gz", {**PHOTOS, "../evil.png": PHOTOS["set/0_astronaut.png"]})
    with pytest.raises(UnsafeArchive, match=r"'\.\./evil\.png' has a parent-directory"):
        ingest(tmp_path, upload, preprocess=SPEC)
    assert list(sets_dir(tmp_path).iterdir()) == []


def test_preprocessed_images_over_the_bound_are_too_large(tmp_path: Path) -> None:
    upload = write_images(tmp_path / "p.zip", PHOTOS)
    big = PreprocessSpec(size=(512, 512))  # 4 x 3 x 512 x 512 float32 = 12 MiB from a ~0.5 MiB archive
    with pytest.raises(TooLarge, match="4 preprocessed images of shape \\[3, 512, 512\\]"):
        ingest(tmp_path, upload, preprocess=big, max_bytes=8 * MIB)
    assert list(sets_dir(tmp_path).iterdir()) == []


def test_npz_over_the_uncompressed_bound_is_too_large(tmp_path: Path) -> None:
    np.savez_compressed(tmp_path / "z.npz", x=np.zeros((64, 1024, 64), np.float32))  # 16 MiB of zeros
    with pytest.raises(TooLarge, match="uncompressed bytes, over the limit"):
        ingest(tmp_path, tmp_path / "z.npz", max_bytes=MIB)
    assert list(sets_dir(tmp_path).iterdir()) == []


def test_an_existing_destination_is_a_conflict(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.ones((2, 2), np.float32))
    ingest(tmp_path, tmp_path / "a.npy")
    with pytest.raises(Conflict, match="already stored"):
        ingest(tmp_path, tmp_path / "a.npy")
    assert [p.name for p in sets_dir(tmp_path).iterdir()] == ["one"]


# --- stored form: info, open, batches, split ----------------------------------------------------


def test_info_survives_a_json_round_trip(tmp_path: Path) -> None:
    info = ingest(tmp_path, write_images(tmp_path / "p.tar", {**PHOTOS, "x.txt": b"x"}), preprocess=SPEC)
    again = CalibrationSetInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info
    assert stored(tmp_path).info == info


def test_open_reports_missing_and_damaged_sets(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="No calibration set is stored"):
        CalibrationSet.open(tmp_path / "nowhere")
    np.save(tmp_path / "a.npy", np.ones((4, 2), np.float32))
    ingest(tmp_path, tmp_path / "a.npy")
    np.save(sets_dir(tmp_path) / "one" / "input_0.npy", np.ones((3, 2), np.float32))
    with pytest.raises(InvalidCalibrationSet, match="does not match its description"):
        stored(tmp_path)


@pytest.fixture
def forty_samples(tmp_path: Path) -> tuple[CalibrationSet, dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {
        "image": RNG.standard_normal((40, 3, 4, 4)).astype(np.float32),
        "scale": RNG.random((40, 1)),
    }
    np.savez(tmp_path / "s.npz", image=arrays["image"], scale=arrays["scale"])
    ingest(tmp_path, tmp_path / "s.npz")
    return stored(tmp_path), arrays


@pytest.mark.parametrize("batch_size", [1, 3, 8, 40, 64])
@pytest.mark.parametrize(("start", "stop"), [(0, None), (5, 17), (39, 40), (12, 12)])
def test_batches_reproduce_the_data_for_any_size_and_range(
    forty_samples: tuple[CalibrationSet, dict[str, np.ndarray]], batch_size: int, start: int, stop: int | None
) -> None:
    calibration_set, arrays = forty_samples
    batches = list(calibration_set.batches(batch_size, start=start, stop=stop))
    end = 40 if stop is None else stop
    assert [len(b["image"]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert len(batches) == -(-(end - start) // batch_size)
    for name, array in arrays.items():
        joined = np.concatenate([b[name] for b in batches]) if batches else array[:0]
        np.testing.assert_array_equal(joined, array[start:end])
    assert all(b["image"].flags.c_contiguous and b["image"].flags.owndata for b in batches)


def test_batches_are_keyed_by_model_input_names_when_bound(
    forty_samples: tuple[CalibrationSet, dict[str, np.ndarray]],
) -> None:
    calibration_set, arrays = forty_samples
    batch = next(calibration_set.batches(4, bind={"pixels": "image"}))
    assert list(batch) == ["pixels"]
    np.testing.assert_array_equal(batch["pixels"], arrays["image"][:4])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"batch_size": 4, "start": 30, "stop": 20}, "Sample range 30:20 is outside"),
        ({"batch_size": 4, "stop": 41}, "Sample range 0:41 is outside the set's 40 samples"),
        ({"batch_size": 4, "bind": {"pixels": "nope"}}, "no arrays named \\['nope'\\]"),
    ],
)
def test_batches_reject_bad_arguments(
    forty_samples: tuple[CalibrationSet, dict[str, np.ndarray]], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(BadInput, match=message):
        forty_samples[0].batches(**kwargs)


def _set_of(tmp_path: Path, samples: int) -> CalibrationSet:
    tmp_path.mkdir(exist_ok=True)
    np.save(tmp_path / "s.npy", np.zeros((samples, 1), np.float32))
    ingest(tmp_path, tmp_path / "s.npy")
    return stored(tmp_path)


@pytest.mark.parametrize(
    ("samples", "fraction", "calibration", "held_out"),
    [
        (10, 0.2, range(0, 8), range(8, 10)),
        (10, 0.0, range(0, 10), range(10, 10)),
        (7, 0.5, range(0, 3), range(3, 7)),
        (3, 0.01, range(0, 2), range(2, 3)),
        (2, 0.9, range(0, 1), range(1, 2)),
    ],
)
def test_split_holds_out_the_tail_deterministically(
    tmp_path: Path, samples: int, fraction: float, calibration: range, held_out: range
) -> None:
    assert _set_of(tmp_path, samples).split(fraction) == (calibration, held_out)


def test_split_rejects_impossible_fractions(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="holdout_fraction must be in \\[0, 1\\)"):
        _set_of(tmp_path, 5).split(1.0)
    with pytest.raises(InvalidCalibrationSet, match="single sample"):
        _set_of(tmp_path / "one_sample", 1).split(0.2)


def _peak_batch_memory(calibration_set: CalibrationSet) -> int:
    tracemalloc.start()
    try:
        for batch in calibration_set.batches(8):
            del batch
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_batch_memory_does_not_grow_with_the_number_of_samples(tmp_path: Path) -> None:
    sample_shape = (3, 32, 32)  # 12 KiB per sample
    small_dir, large_dir = tmp_path / "small", tmp_path / "large"
    small_dir.mkdir()
    large_dir.mkdir()
    np.save(small_dir / "s.npy", RNG.standard_normal((64, *sample_shape)).astype(np.float32))
    np.save(large_dir / "s.npy", RNG.standard_normal((640, *sample_shape)).astype(np.float32))
    ingest(small_dir, small_dir / "s.npy")
    ingest(large_dir, large_dir / "s.npy")

    small = _peak_batch_memory(stored(small_dir))
    large = _peak_batch_memory(stored(large_dir))
    large_bytes = 640 * 3 * 32 * 32 * 4
    assert large < small * 1.5 + 64 * 1024
    assert large < large_bytes / 10


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_ingest_memory_does_not_grow_with_the_number_of_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # A small copy chunk makes "bounded by the chunk, not the set" visible with small test files.
    monkeypatch.setattr("service.datasets.ingest_arrays._CHUNK_BYTES", 64 * 1024)
    peaks = []
    for samples in (64, 640):
        root = tmp_path / str(samples)
        root.mkdir()
        data = RNG.standard_normal((samples, 3, 32, 32)).astype(np.float32)  # 12 KiB per sample
        upload = root / f"s.{fmt}"
        if fmt == "npy":
            np.save(upload, data)
        else:
            np.savez_compressed(upload, x=data)
        del data
        tracemalloc.start()
        try:
            ingest(root, upload)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < peaks[0] * 1.5 + 256 * 1024
    assert peaks[1] < 640 * 12 * 1024 / 4


# --- binding to model inputs --------------------------------------------------------------------


def _info(
    *inputs: tuple[str, tuple[int, ...], str], named: bool = True, fmt: SetFormat | None = None
) -> CalibrationSetInfo:
    stats = ChannelStats(None, (0.0,), (1.0,), (0.5,), (0.1,))
    summaries = tuple(InputSummary(name, named, shape, dtype, stats) for name, shape, dtype in inputs)
    return CalibrationSetInfo(fmt or ("npz" if named else "npy"), 10, summaries, "set")


IMAGE = TensorSpec("image", "float32", ("N", 3, 224, 224))
MASK = TensorSpec("mask", "float32", ("N", "H", "W"))


@pytest.mark.parametrize(
    ("info", "inputs", "binding"),
    [
        (_info(("input", (3, 224, 224), "float32"), named=False), [IMAGE], {"image": "input"}),
        (
            _info(("input", (3, 224, 224), "float32"), named=False),
            [TensorSpec("x", "float32", (1, 3, 224, 224))],
            {"x": "input"},
        ),
        (
            _info(("image", (3, 224, 224), "float32"), ("mask", (100, 50), "float32")),
            [MASK, IMAGE],
            {"mask": "mask", "image": "image"},
        ),
        (_info(("ids", (), "int64")), [TensorSpec("ids", "int64", ("?",))], {"ids": "ids"}),
    ],
    ids=["unnamed", "fixed batch of one", "named, symbolic dims", "scalar samples"],
)
def test_bind_maps_model_inputs_to_stored_arrays(
    info: CalibrationSetInfo, inputs: list[TensorSpec], binding: dict[str, str]
) -> None:
    assert bind_to_model(info, inputs) == binding


@pytest.mark.parametrize(
    ("info", "inputs", "message"),
    [
        (
            _info(("image", (3, 224, 224), "float32"), ("extra", (1,), "float32")),
            [IMAGE, MASK],
            r"missing arrays for model inputs \['mask'\]; arrays \['extra'\] that are not model inputs",
        ),
        (
            _info(("input", (3, 224, 224), "float32"), named=False),
            [IMAGE, MASK],
            r"one unnamed array \(uploaded as npy\), but the model has 2 inputs \['image', 'mask'\]",
        ),
        (_info(("image", (224, 224), "float32")), [IMAGE], r"rank 4 .* rank 3 \['samples', 224, 224\]"),
        (_info(("image", (1, 3, 224, 224), "float32")), [IMAGE], "carries its own batch axis of 1"),
        (
            _info(("image", (3, 192, 224), "float32")),
            [IMAGE],
            "axis 2 is 224 in the model but 192 in the data",
        ),
        (
            _info(("image", (224, 224, 3), "float32")),
            [IMAGE],
            "the axes look permuted: check the NCHW/NHWC layout",
        ),
        (
            _info(("image", (3, 224, 224), "float16")),
            [IMAGE],
            r"'image' expects float32 but the data is float16; nothing is cast implicitly, "
            r"save it with \.astype\(np\.float32\)",
        ),
        (
            _info(("input", (3, 224, 224), "uint8"), named=False, fmt="images"),
            [IMAGE],
            "expects float32 but the data is uint8; nothing is cast implicitly, set the preprocess dtype",
        ),
        (
            _info(("image", (3, 224, 224), "float32")),
            [TensorSpec("image", "unknown", ("N", 3, 224, 224))],
            "not a plain tensor",
        ),
        (
            _info(("a", (5, 7), "float32"), ("b", (6, 7), "float32")),
            [TensorSpec("a", "float32", ("N", "S", 7)), TensorSpec("b", "float32", ("N", "S", 7))],
            "dim 'S' is 5 in 'a' but 6 in 'b'",
        ),
        (_info(("x", (3,), "float32")), [], "The model has no inputs"),
    ],
    ids=[
        "missing and extra",
        "unnamed for two inputs",
        "rank",
        "extra batch axis",
        "fixed dim",
        "permuted layout",
        "float16 for float32",
        "uint8 images for float32",
        "non-tensor input",
        "symbol conflict",
        "no inputs",
    ],
)
def test_bind_reports_what_does_not_fit(
    info: CalibrationSetInfo, inputs: list[TensorSpec], message: str
) -> None:
    with pytest.raises(InvalidCalibrationSet, match=message):
        bind_to_model(info, inputs)


def test_bind_lists_every_problem_at_once() -> None:
    info = _info(("image", (3, 100, 100), "float16"))
    with pytest.raises(InvalidCalibrationSet) as caught:
        bind_to_model(info, [IMAGE])
    assert len(caught.value.details["problems"]) == 2


# --- end to end with real models ----------------------------------------------------------------


def test_multi_input_npz_feeds_onnx_runtime_batch_by_batch(tmp_path: Path) -> None:
    model = two_input_adder(size=8)
    arrays = {
        "image": RNG.standard_normal((10, 3, 8, 8)).astype(np.float32),
        "bias_map": RNG.standard_normal((10, 4, 8, 8)).astype(np.float32),
    }
    np.savez(tmp_path / "two.npz", image=arrays["image"], bias_map=arrays["bias_map"])
    info = ingest(tmp_path, tmp_path / "two.npz")
    binding = bind_to_model(info, model_inputs(model))
    session = ort.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])
    outputs = [session.run(None, batch)[0] for batch in stored(tmp_path).batches(3, bind=binding)]
    np.testing.assert_allclose(np.concatenate(outputs), session.run(None, arrays)[0], rtol=1e-5, atol=1e-6)


def test_image_set_binds_to_a_classifier_and_runs(tmp_path: Path) -> None:
    model = resnet_block_classifier(size=32)
    spec = PreprocessSpec(size=(32, 32), resize="shorter_side_center_crop", mean=(0.5,), std=(0.25,))
    info = ingest(tmp_path, write_images(tmp_path / "p.tgz", PHOTOS), preprocess=spec)
    binding = bind_to_model(info, model_inputs(model))
    assert binding == {"input": "input"}
    session = ort.InferenceSession(model_bytes(model), providers=["CPUExecutionProvider"])
    logits = [session.run(None, batch)[0] for batch in stored(tmp_path).batches(2, bind=binding)]
    assert np.concatenate(logits).shape == (4, 10) and np.isfinite(np.concatenate(logits)).all()
