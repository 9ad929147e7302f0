"""Safe archive reading: listings, member bytes, and every way an archive can be unsafe or too large."""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from service.datasets.archives import (
    ArchiveKind,
    SafeZip,
    SkippedMember,
    read_images,
    scan_archive,
    unsafe_reason,
)
from service.errors import InvalidCalibrationSet, TooLarge, UnsafeArchive

MIB = 1024 * 1024
BOUNDS = {"max_members": 100, "max_total_bytes": 64 * MIB}


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


PHOTOS = {
    "photos/b_chelsea.jpg": jpeg(skimage.data.chelsea()),
    "photos/a_astronaut.png": png(skimage.data.astronaut()[::4, ::4]),
    "photos/c_coffee.JPEG": jpeg(skimage.data.coffee()[::2, ::2]),
}
NOT_IMAGES = {
    "photos/notes.txt": b"shot on a sunny day",
    "__MACOSX/photos/._b_chelsea.jpg": b"\x00\x05\x16\x07 AppleDouble",
}


def write_zip(path: Path, members: dict[str, bytes], *, directories: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for directory in directories:
            archive.writestr(zipfile.ZipInfo(directory), b"")
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def write_tar(
    path: Path, members: dict[str, bytes], mode: str = "w", *, directories: tuple[str, ...] = ()
) -> Path:
    with tarfile.open(path, mode) as archive:  # type: ignore[call-overload]
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for name, data in members.items():
            archive.addfile(*tar_file(name, data))
    return path


ARCHIVE_WRITERS: dict[str, tuple[ArchiveKind, Callable[[Path, dict[str, bytes]], Path]]] = {
    "zip": ("zip", lambda p, m: write_zip(p / "set.zip", m, directories=("photos/",))),
    "tar": ("tar", lambda p, m: write_tar(p / "set.tar", m, directories=("photos",))),
    "tar.gz": ("tar", lambda p, m: write_tar(p / "set.tar.gz", m, "w:gz")),
    "tar.bz2": ("tar", lambda p, m: write_tar(p / "set.tar.bz2", m, "w:bz2")),
    "tar.xz": ("tar", lambda p, m: write_tar(p / "set.tar.xz", m, "w:xz")),
}


@pytest.mark.parametrize("fmt", list(ARCHIVE_WRITERS))
def test_scan_lists_images_sorted_and_reports_everything_else(tmp_path: Path, fmt: str) -> None:
    kind, write = ARCHIVE_WRITERS[fmt]
    path = write(tmp_path, {**PHOTOS, **NOT_IMAGES})
    listing = scan_archive(path, kind, **BOUNDS)
    assert listing.images == ("photos/a_astronaut.png", "photos/b_chelsea.jpg", "photos/c_coffee.JPEG")
    assert listing.skipped == (
        SkippedMember(
            "__MACOSX/photos/._b_chelsea.jpg", "named like an image but its content is not PNG or JPEG"
        ),
        SkippedMember("photos/notes.txt", "not a .png, .jpg or .jpeg file"),
    )
    assert listing.declared_bytes == sum(map(len, {**PHOTOS, **NOT_IMAGES}.values()))


@pytest.mark.parametrize("fmt", list(ARCHIVE_WRITERS))
def test_read_images_yields_each_image_once_with_its_sorted_index(tmp_path: Path, fmt: str) -> None:
    kind, write = ARCHIVE_WRITERS[fmt]
    path = write(tmp_path, {**NOT_IMAGES, **PHOTOS})
    listing = scan_archive(path, kind, **BOUNDS)
    members = list(read_images(path, listing, max_total_bytes=BOUNDS["max_total_bytes"]))
    assert sorted(m.index for m in members) == [0, 1, 2]
    for member in members:
        assert listing.images[member.index] == member.name
        assert member.data == PHOTOS[member.name]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.png", "parent-directory"),
        ("photos/../../evil.png", "parent-directory"),
        ("photos\\..\\..\\evil.png", "parent-directory"),
        ("/abs.png", "absolute path"),
        ("C:/windows/abs.png", "absolute path"),
        ("", "empty name"),
        ("photos/a.png", None),
        ("photos/..hidden.png", None),
    ],
)
def test_unsafe_reason_flags_names_that_escape_the_root(name: str, reason: str | None) -> None:
    found = unsafe_reason(name)
    assert found is None if reason is None else reason in (found or "")


@pytest.mark.parametrize("name", ["../evil.png", "/abs.png", "photos/../../evil.png"])
@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_traversal_and_absolute_names_are_unsafe(tmp_path: Path, fmt: str, name: str) -> None:
    kind, write = ARCHIVE_WRITERS[fmt]
    path = write(tmp_path, {**PHOTOS, name: PHOTOS["photos/a_astronaut.png"]})
    with pytest.raises(
        UnsafeArchive,
        match=r"Archive member '(.*evil\.png|/abs\.png)' has (a parent-directory|an absolute path)",
    ):
        scan_archive(path, kind, **BOUNDS)


def tar_with_special(path: Path, member_type: bytes) -> Path:
    with tarfile.open(path, "w") as archive:
        archive.addfile(*tar_file("photos/a.png", PHOTOS["photos/a_astronaut.png"]))
        info = tarfile.TarInfo("photos/link.png")
        info.type = member_type
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    return path


def zip_with_mode(path: Path, file_type: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("photos/a.png", PHOTOS["photos/a_astronaut.png"])
        info = zipfile.ZipInfo("photos/link.png")
        info.create_system = 3  # Unix: the high bits of external_attr are st_mode
        info.external_attr = (file_type | 0o777) << 16
        archive.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("build", "kind", "message"),
    [
        (lambda p: tar_with_special(p / "s.tar", tarfile.SYMTYPE), "tar", "is a symbolic or hard link"),
        (lambda p: tar_with_special(p / "h.tar", tarfile.LNKTYPE), "tar", "is a symbolic or hard link"),
        (lambda p: tar_with_special(p / "c.tar", tarfile.CHRTYPE), "tar", "is a device, FIFO"),
        (lambda p: tar_with_special(p / "b.tar", tarfile.BLKTYPE), "tar", "is a device, FIFO"),
        (lambda p: tar_with_special(p / "f.tar", tarfile.FIFOTYPE), "tar", "is a device, FIFO"),
        (lambda p: zip_with_mode(p / "s.zip", stat.S_IFLNK), "zip", "is a symbolic or hard link"),
        (lambda p: zip_with_mode(p / "c.zip", stat.S_IFCHR), "zip", "is a device, FIFO"),
    ],
    ids=[
        "tar-symlink",
        "tar-hardlink",
        "tar-chardev",
        "tar-blockdev",
        "tar-fifo",
        "zip-symlink",
        "zip-chardev",
    ],
)
def test_links_and_special_files_are_unsafe(
    tmp_path: Path, build: Callable[[Path], Path], kind: ArchiveKind, message: str
) -> None:
    with pytest.raises(UnsafeArchive, match=f"'photos/link.png' {message}"):
        scan_archive(build(tmp_path), kind, **BOUNDS)


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_member_count_over_the_bound_is_too_large(tmp_path: Path, fmt: str) -> None:
    kind, write = ARCHIVE_WRITERS[fmt]
    path = write(tmp_path, {f"photos/{i}.txt": b"x" for i in range(5)})  # 6 entries with the directory
    with pytest.raises(TooLarge, match=r"more than 5 members.*ENGINE_SERVICE_MAX_ARCHIVE_MEMBERS"):
        scan_archive(path, kind, max_members=5, max_total_bytes=MIB)


def test_a_zip_directory_too_large_for_the_member_bound_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "padded.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for index in range(3):
            info = zipfile.ZipInfo(f"{index}.txt")
            info.comment = b"c" * 30_000  # member comments live in the central directory
            archive.writestr(info, b"x")
    with pytest.raises(TooLarge, match=r"directory is \d+ bytes, too large for 3 members"):
        scan_archive(path, "zip", max_members=3, max_total_bytes=MIB)
    with pytest.raises(TooLarge, match="directory is"):
        SafeZip(path, max_members=3, max_total_bytes=MIB)


def zeros_bomb(path: Path, fmt: str) -> Path:
    members = {"photos/a.png": PHOTOS["photos/a_astronaut.png"], "photos/bomb.png": bytes(32 * MIB)}
    if fmt == "zip":
        return write_zip(path / "bomb.zip", members)
    return write_tar(path / "bomb.tar.gz", members, "w:gz")


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_a_compression_bomb_is_stopped_at_the_declared_bound(tmp_path: Path, fmt: str) -> None:
    path = zeros_bomb(tmp_path, fmt)
    assert path.stat().st_size < MIB  # 32 MiB of zeros compress to almost nothing
    with pytest.raises(TooLarge, match=f"more than {4 * MIB} uncompressed bytes"):
        scan_archive(path, "zip" if fmt == "zip" else "tar", max_members=10, max_total_bytes=4 * MIB)


def test_a_zip_whose_headers_understate_sizes_never_expands_past_them(tmp_path: Path) -> None:
    # The headers say 100 bytes but the deflated stream holds 32 MiB: the member reader inflates at most
    # one read past the declared size and reports the archive malformed rather than expanding it.
    data = bytearray(
        write_zip(
            tmp_path / "lying.zip", {"photos/bomb.png": b"\x89PNG\r\n\x1a\n" + bytes(32 * MIB)}
        ).read_bytes()
    )
    struct.pack_into("<I", data, 22, 100)  # local header: uncompressed size
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 100)  # central directory: uncompressed size
    path = tmp_path / "lying.zip"
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.infolist()[0].file_size == 100
    with pytest.raises(InvalidCalibrationSet, match=r"more data than its header declares"):
        listing = scan_archive(path, "zip", max_members=10, max_total_bytes=MIB)
        list(read_images(path, listing, max_total_bytes=MIB))


def test_an_oversized_tar_extension_header_is_refused_before_it_is_buffered(tmp_path: Path) -> None:
    path = tmp_path / "pax.tar.gz"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as archive:
        info, data = tar_file("photos/a.png", PHOTOS["photos/a_astronaut.png"])
        info.pax_headers = {"comment": "x" * (4 * MIB)}
        archive.addfile(info, data)
    with pytest.raises(TooLarge, match="headers or data run past"):
        scan_archive(path, "tar", **BOUNDS)


def test_members_larger_than_the_header_allowance_still_read_from_a_tar(tmp_path: Path) -> None:
    noise = png(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    assert len(noise) > 3 * MIB  # random pixels do not compress
    path = write_tar(tmp_path / "big.tar.gz", {"a.png": noise, "b.png": noise}, "w:gz")
    listing = scan_archive(path, "tar", **BOUNDS)
    assert [m.data == noise for m in read_images(path, listing, max_total_bytes=8 * MIB)] == [True, True]


def test_bytes_actually_read_are_counted_against_the_bound(tmp_path: Path) -> None:
    photo = PHOTOS["photos/a_astronaut.png"]
    path = write_zip(tmp_path / "two.zip", {"a.png": photo, "b.png": photo})
    listing = scan_archive(path, "zip", **BOUNDS)
    with pytest.raises(TooLarge, match=f"expands past the limit of {len(photo) + 1} uncompressed bytes"):
        list(read_images(path, listing, max_total_bytes=len(photo) + 1))


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_a_name_appearing_twice_is_rejected(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"dup.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("a.png", PHOTOS["photos/a_astronaut.png"])
            with pytest.warns(UserWarning, match="Duplicate name"):
                archive.writestr("a.png", PHOTOS["photos/a_astronaut.png"])
    else:
        with tarfile.open(path, "w") as archive:
            archive.addfile(*tar_file("a.png", PHOTOS["photos/a_astronaut.png"]))
            archive.addfile(*tar_file("a.png", PHOTOS["photos/a_astronaut.png"]))
    with pytest.raises(InvalidCalibrationSet, match=r"holds 'a\.png' twice"):
        scan_archive(path, fmt, **BOUNDS)  # type: ignore[arg-type]


def test_encrypted_zip_members_are_rejected(tmp_path: Path) -> None:
    data = bytearray(
        write_zip(tmp_path / "enc.zip", {"a.png": PHOTOS["photos/a_astronaut.png"]}).read_bytes()
    )
    data[6] |= 0x1  # local header: general purpose flag "encrypted"
    data[data.rfind(b"PK\x01\x02") + 8] |= 0x1  # central directory copy of the flag
    (tmp_path / "enc.zip").write_bytes(bytes(data))
    with pytest.raises(InvalidCalibrationSet, match=r"'a\.png' is encrypted"):
        scan_archive(tmp_path / "enc.zip", "zip", **BOUNDS)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_a_truncated_archive_is_reported_damaged(tmp_path: Path, fmt: str) -> None:
    kind, write = ARCHIVE_WRITERS[fmt]
    path = write(tmp_path, PHOTOS)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InvalidCalibrationSet, match=r"damaged|not a"):
        listing = scan_archive(path, kind, **BOUNDS)
        list(read_images(path, listing, max_total_bytes=BOUNDS["max_total_bytes"]))


def test_safe_zip_lists_regular_members_and_applies_the_same_checks(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "a.zip", {"b.npy": b"22", "a.npy": b"1"}, directories=("dir/",))
    with SafeZip(path, **BOUNDS) as archive:
        assert archive.names == ("a.npy", "b.npy")
        with archive.open("b.npy") as stream:
            assert stream.read() == b"22"
    with pytest.raises(TooLarge, match="declares 3 uncompressed bytes, over the limit of 2"):
        SafeZip(path, max_members=10, max_total_bytes=2)
    with pytest.raises(UnsafeArchive, match="parent-directory"):
        SafeZip(write_zip(tmp_path / "evil.zip", {"../x.npy": b"1"}), **BOUNDS)
