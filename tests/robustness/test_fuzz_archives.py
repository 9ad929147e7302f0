"""Fuzzing calibration-set intake: any upload becomes a stored set, or a 4xx error and nothing on disk.

Every example runs the real ``ingest_calibration_upload`` on bytes derived from valid uploads (image
archives as zip, tar, tar.gz, tar.bz2 and tar.xz; .npz; .npy): random bytes behind real magic
numbers, truncations, bit flips, spliced junk, member names built to escape the extraction root,
forged sizes in zip and tar headers and in .npy headers. The properties:

* the only exceptions are InvalidCalibrationSet, UnsafeArchive (HTTP 400) and TooLarge (413);
* a member name that could escape the root is refused as UnsafeArchive;
* nothing is written outside the set's own directory: the rest of the sandbox (the working
  directory included) is byte-for-byte unchanged, and a failed ingest leaves no temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image

from service.datasets.archives import unsafe_reason
from service.datasets.ingest import ingest_calibration_upload
from service.datasets.preprocess import PreprocessSpec
from service.datasets.set_info import CalibrationSetInfo
from service.errors import InvalidCalibrationSet, TooLarge, UnsafeArchive
from tests.data_factory import npy_bytes, npz_bytes, photo

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
REJECTIONS = (InvalidCalibrationSet, UnsafeArchive, TooLarge)
MAX_MEMBERS = 64
MAX_BYTES = 4 * 1024 * 1024
SPEC = PreprocessSpec(size=(8, 8))


def _tiny_png(name: str, side: int = 12) -> bytes:
    image = Image.fromarray(photo(name)).resize((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = {
    "set/a.png": _tiny_png("astronaut"),
    "set/b.png": _tiny_png("coffee", 10),
    "set/c.png": _tiny_png("chelsea"),
    "set/notes.txt": b"three photos",
}


def zip_bytes(members: dict[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], compression: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SAMPLES = np.linspace(-1.0, 1.0, 4 * 3 * 4 * 4, dtype=np.float32).reshape(4, 3, 4, 4)


@dataclass(frozen=True)
class Upload:
    """A valid upload to derive damaged ones from, with the preprocess spec it needs."""

    name: str
    data: bytes
    preprocess: PreprocessSpec | None


UPLOADS = {
    "zip": Upload("set.zip", zip_bytes(IMAGES), SPEC),
    "zip-stored": Upload("set.zip", zip_bytes(IMAGES, compression=zipfile.ZIP_STORED), SPEC),
    "tar": Upload("set.tar", tar_bytes(IMAGES), SPEC),
    "tar.gz": Upload("set.tar.gz", tar_bytes(IMAGES, "gz"), SPEC),
    "tar.bz2": Upload("set.tar.bz2", tar_bytes(IMAGES, "bz2"), SPEC),
    "tar.xz": Upload("set.tar.xz", tar_bytes(IMAGES, "xz"), SPEC),
    "npz": Upload("set.npz", npz_bytes(input=SAMPLES, mask=SAMPLES[:, :1] > 0), None),
    "npy": Upload("set.npy", npy_bytes(SAMPLES), None),
}
uploads = st.sampled_from(sorted(UPLOADS)).map(UPLOADS.__getitem__)


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
    }


def _note(outcome: str) -> None:
    """Count outcomes in --hypothesis-show-statistics (also usable outside a hypothesis test)."""
    if currently_in_test_context():
        event(outcome)


def ingest_in_sandbox(
    data: bytes, filename: str, preprocess: PreprocessSpec | None
) -> CalibrationSetInfo | None:
    """Ingest ``data`` inside a fresh sandbox and check the aftermath; None when it was rejected.

    The working directory is moved into the sandbox too, so a relative write by a member name
    would land where the check sees it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        upload = sandbox / "incoming" / "upload.bin"
        upload.parent.mkdir()
        upload.write_bytes(data)
        (sandbox / "cwd").mkdir()
        sets = sandbox / "sets"
        dest = sets / "one"
        before = _tree(sandbox)
        try:
            with contextlib.chdir(sandbox / "cwd"):
                info = ingest_calibration_upload(
                    upload,
                    filename,
                    dest,
                    preprocess=preprocess,
                    max_members=MAX_MEMBERS,
                    max_uncompressed_bytes=MAX_BYTES,
                )
        except REJECTIONS as exc:
            assert exc.message.strip()
            _note(f"rejected: {type(exc).__name__}")
            after = _tree(sandbox)
            after.pop("sets", None)  # the parent may be created; it must be left empty
            assert after == before, "a rejected upload changed files outside its destination"
            assert not sets.exists() or not any(sets.iterdir()), "a rejected upload left a temporary behind"
            return None
        _note("accepted")
        after = {k: v for k, v in _tree(sandbox).items() if k != "sets" and not k.startswith("sets/")}
        assert after == before, "an accepted upload changed files outside its destination"
        assert [p.name for p in sets.iterdir()] == ["one"], "an accepted upload left a temporary behind"
        assert info.samples > 0
        json.dumps(info.to_dict(), allow_nan=False)  # the API answers with this as strict JSON
        return info


@FUZZ
@given(
    magic=st.sampled_from(
        [b"", b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x93NUMPY"]
    ),
    tail=st.binary(max_size=2048),
    preprocess=st.sampled_from([None, SPEC]),
)
def test_random_bytes_behind_a_real_magic_number_are_rejected_cleanly(
    magic: bytes, tail: bytes, preprocess: PreprocessSpec | None
) -> None:
    assert ingest_in_sandbox(magic + tail, "upload.bin", preprocess) is None


@FUZZ
@given(tail=st.binary(max_size=1024), entry=st.binary(min_size=0, max_size=512))
def test_random_tar_headers_are_rejected_cleanly(tail: bytes, entry: bytes) -> None:
    header = bytearray(entry.ljust(512, b"\x00")[:512])
    header[257:263] = b"ustar\x00"  # recognised as a tar by content
    assert ingest_in_sandbox(bytes(header) + tail, "upload.tar", SPEC) is None


@FUZZ
@given(upload=uploads, cut=st.floats(0.0, 1.0, exclude_max=True))
def test_a_truncated_upload_is_rejected_cleanly(upload: Upload, cut: float) -> None:
    # A tar cut at a member boundary is still a (shorter) valid tar, so "accepted" is possible there.
    ingest_in_sandbox(upload.data[: int(len(upload.data) * cut)], upload.name, upload.preprocess)


@FUZZ
@given(
    upload=uploads,
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=6
    ),
)
def test_bit_flips_in_an_upload_are_stored_or_rejected_cleanly(
    upload: Upload, flips: list[tuple[float, int]]
) -> None:
    damaged = bytearray(upload.data)
    for where, bit in flips:
        damaged[int(where * len(damaged))] ^= 1 << bit
    ingest_in_sandbox(bytes(damaged), upload.name, upload.preprocess)


@FUZZ
@given(
    upload=uploads, where=st.floats(0.0, 1.0), junk=st.binary(min_size=1, max_size=64), replace=st.booleans()
)
def test_junk_spliced_into_an_upload_is_stored_or_rejected_cleanly(
    upload: Upload, where: float, junk: bytes, replace: bool
) -> None:
    at = int(where * len(upload.data))
    spliced = upload.data[:at] + junk + upload.data[at + (len(junk) if replace else 0) :]
    ingest_in_sandbox(spliced, upload.name, upload.preprocess)


# Names built from the pieces that make paths escape: separators of both kinds, dots, drive letters,
# and odd unicode (right-to-left override, combining marks, full-width solidus, astral characters).
NAME_PIECES = st.sampled_from(
    [
        "..",
        ".",
        "/",
        "\\",
        "C:",
        "c:\\",
        "a",
        "set",
        "é",
        "\u202e",
        "e\u0301",
        "\uff0f",
        "\U0001f600",
        " ",
        "~",
    ]
)
member_names = st.lists(NAME_PIECES, min_size=1, max_size=6).map("".join).map(lambda stem: stem + ".png")


@FUZZ
@given(
    names=st.lists(member_names, min_size=1, max_size=4, unique=True),
    container=st.sampled_from(["zip", "tar", "gz"]),
)
def test_member_names_that_could_escape_the_root_are_refused(names: list[str], container: str) -> None:
    members = {name: IMAGES["set/a.png"] for name in names}
    data = (
        zip_bytes(members) if container == "zip" else tar_bytes(members, "" if container == "tar" else "gz")
    )
    unsafe = [name for name in names if unsafe_reason(name) is not None]
    if unsafe:
        with pytest.raises(UnsafeArchive, match=r"absolute path|parent-directory"):
            _ingest_raising(data, SPEC)
    else:
        info = ingest_in_sandbox(data, f"names.{container}", SPEC)
        # Two names can be one file once read (a tar drops a trailing slash); otherwise all are stored.
        assert info is None or info.samples == len(names)


def _ingest_raising(data: bytes, preprocess: PreprocessSpec | None) -> None:
    """Like ingest_in_sandbox, but lets the rejection propagate after checking the aftermath."""
    with tempfile.TemporaryDirectory() as tmp:
        sandbox = Path(tmp)
        (sandbox / "upload.bin").write_bytes(data)
        (sandbox / "cwd").mkdir()
        before = _tree(sandbox)
        try:
            with contextlib.chdir(sandbox / "cwd"):
                ingest_calibration_upload(
                    sandbox / "upload.bin",
                    "upload",
                    sandbox / "sets" / "one",
                    preprocess=preprocess,
                    max_members=MAX_MEMBERS,
                    max_uncompressed_bytes=MAX_BYTES,
                )
        finally:
            after = _tree(sandbox)
            after.pop("sets", None)
            assert after == before
            assert not (sandbox / "sets").exists() or not any((sandbox / "sets").iterdir())


ZIP_LOCAL, ZIP_CENTRAL = b"PK\x03\x04", b"PK\x01\x02"


def _forge_zip_sizes(data: bytes, size: int, *, central: bool, local: bool) -> bytes:
    """Write ``size`` as every member's uncompressed size in the chosen zip headers."""
    forged = bytearray(data)
    if local:
        for match in re.finditer(re.escape(ZIP_LOCAL), data):
            struct.pack_into("<I", forged, match.start() + 22, size)
    if central:
        for match in re.finditer(re.escape(ZIP_CENTRAL), data):
            struct.pack_into("<I", forged, match.start() + 24, size)
    return bytes(forged)


@FUZZ
@given(
    upload=st.sampled_from(["zip", "zip-stored", "npz"]).map(UPLOADS.__getitem__),
    size=st.one_of(st.integers(0, 4096), st.integers(MAX_BYTES, 2**32 - 1)),
    central=st.booleans(),
    local=st.booleans(),
)
def test_forged_zip_sizes_are_refused_or_never_read_past(
    upload: Upload, size: int, central: bool, local: bool
) -> None:
    forged = _forge_zip_sizes(upload.data, size, central=central, local=local)
    info = ingest_in_sandbox(forged, upload.name, upload.preprocess)
    if central and size >= MAX_BYTES:  # every upload here has two or more members
        assert info is None


def _tar_size_field(size: int) -> bytes:
    """A tar header size field: 11 octal digits, or GNU base-256 past what octal can hold."""
    if size < 8**11:
        return f"{size:011o}".encode() + b"\x00"
    return bytes([0x80]) + size.to_bytes(11, "big")


def _forge_tar_sizes(data: bytes, size: int) -> bytes:
    """Rewrite every member header's size (and its checksum) in an uncompressed tar."""
    forged = bytearray(data)
    offset = 0
    while offset + 512 <= len(forged) and forged[offset + 257 : offset + 262] == b"ustar":
        real = int(forged[offset + 124 : offset + 136].rstrip(b"\x00 ") or b"0", 8)
        forged[offset + 124 : offset + 136] = _tar_size_field(size)
        forged[offset + 148 : offset + 156] = b" " * 8
        forged[offset + 148 : offset + 156] = f"{sum(forged[offset : offset + 512]):06o}".encode() + b"\x00 "
        offset += 512 + -(-real // 512) * 512
    return bytes(forged)


@FUZZ
@given(size=st.one_of(st.integers(0, 4096), st.integers(MAX_BYTES, 2**40), st.just(2**88 - 1)))
def test_forged_tar_sizes_are_refused_or_never_read_past(size: int) -> None:
    forged = _forge_tar_sizes(UPLOADS["tar"].data, size)
    info = ingest_in_sandbox(forged, "set.tar", SPEC)
    if size > MAX_BYTES:
        assert info is None


def _npy_with_header(header: dict[str, object], payload: bytes) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)  # type: ignore[arg-type]
    return buffer.getvalue() + payload


npy_shapes = st.lists(st.integers(-3, 2**40), min_size=0, max_size=4).map(tuple)


@FUZZ
@given(
    shape=npy_shapes,
    descr=st.sampled_from(["<f4", ">f8", "|u1", "<i8", "|b1", "<c8", "|O", "<U3", "<f2"]),
    fortran=st.booleans(),
    payload=st.binary(max_size=512),
    wrap=st.sampled_from(["npy", "npz"]),
)
def test_forged_npy_headers_are_refused_or_match_their_data(
    shape: tuple[int, ...], descr: str, fortran: bool, payload: bytes, wrap: str
) -> None:
    array = _npy_with_header({"descr": descr, "fortran_order": fortran, "shape": shape}, payload)
    data = array if wrap == "npy" else zip_bytes({"input.npy": array})
    info = ingest_in_sandbox(data, f"forged.{wrap}", None)
    if info is not None:
        (summary,) = info.inputs
        assert (info.samples, *summary.shape) == shape


FORMATS: dict[str, Callable[[dict[str, bytes]], bytes]] = {
    "zip": zip_bytes,
    "tar.gz": lambda members: tar_bytes(members, "gz"),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_valid_seed_upload_is_stored(fmt: str) -> None:
    # The fuzzers above derive from these; each must be a real, accepted upload to begin with.
    info = ingest_in_sandbox(FORMATS[fmt](IMAGES), f"seed.{fmt}", SPEC)
    assert info is not None and info.samples == 3
    for upload in UPLOADS.values():
        assert ingest_in_sandbox(upload.data, upload.name, upload.preprocess) is not None


@pytest.mark.parametrize("upload", ["npz", "zip"])
def test_a_zip_member_needing_a_newer_zip_version_is_rejected(upload: str) -> None:
    data = bytearray(UPLOADS[upload].data)
    struct.pack_into("<H", data, data.find(ZIP_CENTRAL) + 6, 64)  # "version needed to extract": 6.4
    with pytest.raises(InvalidCalibrationSet, match="not supported"):
        _ingest_raising(bytes(data), UPLOADS[upload].preprocess)
