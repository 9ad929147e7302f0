"""Safe, in-memory reading of uploaded archives: zip, tar, and gzip/bzip2/xz-compressed tar.

Nothing is ever extracted to disk. An archive is read twice, sequentially:

* :func:`scan_archive` walks every entry once and rejects the archive (``UnsafeArchive``) on an
  absolute path, a ``..`` component, a symlink, a hardlink or a device/FIFO entry; it raises
  ``TooLarge`` when the member count or the declared uncompressed total exceeds its bound. Regular
  members named ``.png``/``.jpg``/``.jpeg`` whose first bytes are a PNG or JPEG signature are the
  images; every other regular member is reported as a :class:`SkippedMember` with the reason.
  Directories are fine and not reported. Images are listed sorted by name, so indices are stable.
* :func:`read_images` walks the archive again in its own order (compressed tars cannot seek cheaply)
  and yields each image's bytes together with its index in the sorted listing, one member in memory
  at a time. The bytes actually produced are counted against the bound as well, because sizes in
  headers can lie.

:class:`SafeZip` gives the same guarantees for zip containers read by name (``.npz`` uploads).
Zip members are inflated by :class:`~service.datasets.zip_stream.ZipMemberStream`, which bounds
each member (:class:`~service.datasets.zip_stream.ExpansionLimits`) by its header before reading
and by the bytes it actually inflates while reading.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from service.datasets.zip_stream import UNBOUNDED_MEMBERS, ExpansionLimits, ZipMemberStream
from service.errors import InvalidCalibrationSet, TooLarge, UnsafeArchive

ArchiveKind = Literal["zip", "tar"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
# One image is held in memory while it is decoded; no sane PNG/JPEG calibration image is this big.
MAX_IMAGE_MEMBER_BYTES = 256 * 1024 * 1024
# Tar headers (including pax/GNU long-name records) that may precede one member's data. tarfile reads
# such records whole into memory, so a forged multi-gigabyte pax header must be stopped here.
_TAR_HEADER_ALLOWANCE = 1024 * 1024
_TAR_OVERHEAD_PER_MEMBER = 2048
_READ_CHUNK = 1024 * 1024
# zipfile parses the whole central directory into memory on open, whatever its entry count says, so the
# directory's size is bounded first (a legitimate entry is 46 bytes plus its name and extras).
_ZIP_DIRECTORY_BYTES_PER_MEMBER = 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError)


@dataclass(frozen=True)
class SkippedMember:
    """A regular archive member that is not used, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class ArchiveListing:
    """The checked contents of an archive: images sorted by name, and what was skipped."""

    kind: ArchiveKind
    images: tuple[str, ...]
    skipped: tuple[SkippedMember, ...]
    members: int
    declared_bytes: int


@dataclass(frozen=True)
class ArchiveMember:
    """One image's bytes and its position in ``ArchiveListing.images``."""

    name: str
    index: int
    data: bytes


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    kind: Literal["file", "dir", "link", "special"]
    open: Callable[[], IO[bytes]]
    compressed_size: int | None = None  # zip members that are compressed; None for stored and tar members

    def check_declared(self, limits: ExpansionLimits) -> None:
        """Refuse a regular member whose declared size already breaks ``limits``."""
        if self.kind == "file":
            compressed = self.compressed_size
            limits.check_declared(self.name, self.size, compressed or 0, compressed is not None)


class _Budget:
    """Uncompressed bytes actually read, across all members, against the configured bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0

    def spend(self, count: int) -> None:
        self.spent += count
        if self.spent > self.limit:
            raise TooLarge(
                f"The archive expands past the limit of {self.limit} uncompressed bytes; send fewer or "
                "smaller files, or raise ENGINE_SERVICE_MAX_ARCHIVE_UNCOMPRESSED_BYTES."
            )


def unsafe_reason(name: str) -> str | None:
    """Why a member name could escape an extraction root, or None when it is a plain relative path."""
    normalized = name.replace("\\", "/")
    if not normalized or "\x00" in normalized:
        return "an empty name or a NUL character"
    if normalized.startswith("/") or _DRIVE.match(normalized):
        return "an absolute path"
    if ".." in normalized.split("/"):
        return "a parent-directory ('..') component"
    return None


def tar_compression(head: bytes) -> Literal["gz", "bz2", "xz", ""]:
    """The compression wrapped around a tar, from the file's first bytes ("" for none)."""
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return ""


def scan_archive(
    path: Path,
    kind: ArchiveKind,
    *,
    max_members: int,
    max_total_bytes: int,
    limits: ExpansionLimits = UNBOUNDED_MEMBERS,
) -> ArchiveListing:
    """Check every entry of the archive at ``path`` and list its images (see the module docstring)."""
    images: list[str] = []
    skipped: list[SkippedMember] = []
    seen: set[str] = set()
    members = 0
    declared = 0
    with _archive_entries(path, kind, max_members, max_total_bytes, limits) as entries:
        for entry in entries:
            members += 1
            if members > max_members:
                raise _too_many_members(max_members)
            _check_entry(entry)
            entry.check_declared(limits)
            if entry.kind == "dir":
                continue
            if entry.name in seen:
                raise InvalidCalibrationSet(f"The archive holds '{entry.name}' twice; keep one copy.")
            seen.add(entry.name)
            declared += entry.size
            if declared > max_total_bytes:
                raise TooLarge(
                    f"The archive declares more than {max_total_bytes} uncompressed bytes (at "
                    f"'{entry.name}'); send fewer or smaller files, or raise "
                    "ENGINE_SERVICE_MAX_ARCHIVE_UNCOMPRESSED_BYTES."
                )
            reason = _skip_reason(entry, kind)
            if reason is None:
                images.append(entry.name)
            else:
                skipped.append(SkippedMember(entry.name, reason))
    return ArchiveListing(
        kind=kind,
        images=tuple(sorted(images)),
        skipped=tuple(sorted(skipped, key=lambda member: member.name)),
        members=members,
        declared_bytes=declared,
    )


def read_images(
    path: Path, listing: ArchiveListing, *, max_total_bytes: int, limits: ExpansionLimits = UNBOUNDED_MEMBERS
) -> Iterator[ArchiveMember]:
    """Each listed image's bytes with its sorted index, in archive order, one at a time."""
    index_of = {name: index for index, name in enumerate(listing.images)}
    budget = _Budget(max_total_bytes)
    with _archive_entries(path, listing.kind, listing.members, max_total_bytes, limits) as entries:
        for entry in entries:
            index = index_of.get(entry.name)
            if index is None or entry.kind != "file":
                continue
            with _translated_errors(listing.kind), entry.open() as stream:
                data = _read_member(stream, entry, budget)
            yield ArchiveMember(entry.name, index, data)


class SafeZip:
    """A zip read by member name, with the same safety checks and bounds as :func:`scan_archive`.

    ``names`` lists the regular members, sorted; ``open`` returns a stream whose bytes count
    against ``max_total_bytes``. Use as a context manager.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_members: int,
        max_total_bytes: int,
        limits: ExpansionLimits = UNBOUNDED_MEMBERS,
    ) -> None:
        self._budget = _Budget(max_total_bytes)
        self._limits = limits
        _check_zip_directory(path, max_members)
        try:
            self._zip = zipfile.ZipFile(path)
        except NotImplementedError as exc:  # a member needing a newer zip version than zipfile reads
            raise InvalidCalibrationSet(
                f"The zip archive uses a feature that is not supported ({exc})."
            ) from exc
        except _ARCHIVE_ERRORS as exc:
            raise InvalidCalibrationSet(f"The upload is not a readable zip archive ({exc}).") from exc
        try:
            infos = self._zip.infolist()
            if len(infos) > max_members:
                raise _too_many_members(max_members)
            self._infos: dict[str, zipfile.ZipInfo] = {}
            for info in infos:
                entry = _zip_entry(self._zip, info, limits)
                _check_entry(entry)
                entry.check_declared(limits)
                if entry.kind == "dir":
                    continue
                if info.filename in self._infos:
                    raise InvalidCalibrationSet(f"The archive holds '{info.filename}' twice; keep one copy.")
                self._infos[info.filename] = info
            declared = sum(info.file_size for info in self._infos.values())
            if declared > max_total_bytes:
                raise TooLarge(
                    f"The archive declares {declared} uncompressed bytes, over the limit of {max_total_bytes}"
                    "; send less data or raise ENGINE_SERVICE_MAX_ARCHIVE_UNCOMPRESSED_BYTES."
                )
        except BaseException:
            self._zip.close()
            raise
        self.names = tuple(sorted(self._infos))

    def size(self, name: str) -> int:
        return self._infos[name].file_size

    def open(self, name: str) -> IO[bytes]:
        """A counted stream over one member's uncompressed bytes."""
        with _translated_errors("zip"):
            stream = _zip_member(self._zip, self._infos[name], self._limits)
        return _CountedStream(stream, self._budget)  # type: ignore[return-value]

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _CountedStream:
    """Wraps a member stream; every byte it returns is charged to the budget."""

    def __init__(self, stream: IO[bytes], budget: _Budget) -> None:
        self._stream = stream
        self._budget = budget

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._stream.read(size)
        except _ARCHIVE_ERRORS as exc:
            raise InvalidCalibrationSet(f"An archive member is damaged ({exc}).") from exc
        self._budget.spend(len(data))
        return data

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> _CountedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _BoundedTarStream:
    """The decompressed tar byte stream, refusing to run past ``limit`` (moved on per member)."""

    def __init__(self, raw: IO[bytes], hard_limit: int) -> None:
        self._raw = raw
        self.hard_limit = hard_limit
        self.limit = min(_TAR_HEADER_ALLOWANCE, hard_limit)
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        allowed = self.limit - self.position
        wanted = allowed + 1 if size is None or size < 0 or size > allowed else size
        data = self._raw.read(wanted)
        if len(data) > allowed:
            raise TooLarge(
                "The tar archive's headers or data run past the declared sizes and limits "
                f"({self.hard_limit} bytes in all); it is malformed or a decompression bomb."
            )
        self.position += len(data)
        return data


@contextmanager
def _translated_errors(kind: ArchiveKind) -> Iterator[None]:
    """Library errors from reading the archive as InvalidCalibrationSet (only around archive I/O)."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as exc:  # unsupported compression method, encryption
        raise InvalidCalibrationSet(
            f"The {kind} archive uses a feature that is not supported ({exc})."
        ) from exc
    except _ARCHIVE_ERRORS as exc:
        raise InvalidCalibrationSet(f"The archive is damaged or not a {kind} archive ({exc}).") from exc


@contextmanager
def _archive_entries(
    path: Path, kind: ArchiveKind, max_members: int, max_total_bytes: int, limits: ExpansionLimits
) -> Iterator[Iterator[_Entry]]:
    with ExitStack() as stack:
        with _translated_errors(kind):
            if kind == "zip":
                _check_zip_directory(path, max_members)
                archive = stack.enter_context(zipfile.ZipFile(path))
                entries: Iterator[_Entry] = (_zip_entry(archive, info, limits) for info in archive.infolist())
            else:
                raw = stack.enter_context(path.open("rb"))
                compression = tar_compression(raw.read(8))
                raw.seek(0)
                decompressed = stack.enter_context(_decompressed(raw, compression))
                hard_limit = max_total_bytes + (max_members + 1) * _TAR_OVERHEAD_PER_MEMBER
                bounded = _BoundedTarStream(decompressed, hard_limit)
                tar = stack.enter_context(tarfile.open(fileobj=bounded, mode="r|"))  # type: ignore[call-overload]
                entries = _tar_entries(tar, bounded)
        yield entries


def _decompressed(raw: IO[bytes], compression: str) -> IO[bytes]:
    # The caller's ExitStack closes what is returned here.
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if compression == "bz2":
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if compression == "xz":
        return lzma.LZMAFile(raw)  # type: ignore[return-value]
    return raw


def _check_zip_directory(path: Path, max_members: int) -> None:
    """Bound a zip's member count and central directory size from its end record, before zipfile reads it."""
    with path.open("rb") as stream:
        size = stream.seek(0, 2)
        stream.seek(max(0, size - 65536 - 22))  # the end record sits within the last 64 KiB + 22 bytes
        tail = stream.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or len(tail) - end < 22:
            return  # not a zip end record: zipfile reports the damage
        entries, directory_bytes = struct.unpack_from("<HI", tail, end + 10)
        locator = end - 20
        if locator >= 0 and tail[locator : locator + 4] == b"PK\x06\x07":  # zip64 end record
            (offset,) = struct.unpack_from("<Q", tail, locator + 8)
            stream.seek(offset)
            record = stream.read(56)
            if len(record) == 56 and record.startswith(b"PK\x06\x06"):
                entries, directory_bytes = struct.unpack_from("<QQ", record, 32)
    if entries > max_members:
        raise _too_many_members(max_members)
    if directory_bytes > (max_members + 64) * _ZIP_DIRECTORY_BYTES_PER_MEMBER:
        raise TooLarge(
            f"The archive's directory is {directory_bytes} bytes, too large for {max_members} members; "
            "it is malformed or pads its entries."
        )


def _zip_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ExpansionLimits) -> _Entry:
    if info.flag_bits & 0x1:
        raise InvalidCalibrationSet(f"Archive member '{info.filename}' is encrypted; upload it unencrypted.")
    mode = info.external_attr >> 16
    # File-type bits are only meaningful when a Unix tool wrote the entry (create_system 3).
    file_type = stat.S_IFMT(mode) if info.create_system == 3 else 0
    kind: Literal["file", "dir", "link", "special"]
    if info.is_dir() or stat.S_ISDIR(file_type):
        kind = "dir"
    elif stat.S_ISLNK(file_type):
        kind = "link"
    elif file_type in (0, stat.S_IFREG):
        kind = "file"
    else:
        kind = "special"
    compressed = info.compress_size if info.compress_type != zipfile.ZIP_STORED else None
    return _Entry(info.filename, info.file_size, kind, lambda: _zip_member(archive, info, limits), compressed)


def _zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ExpansionLimits) -> IO[bytes]:
    """A bounded stream over one member, read through the archive's own open file."""
    if archive.fp is None:
        raise InvalidCalibrationSet("The zip archive was closed while it was being read.")
    return ZipMemberStream(archive.fp, info, limits)  # type: ignore[return-value]


def _tar_entries(archive: tarfile.TarFile, stream: _BoundedTarStream) -> Iterator[_Entry]:
    while True:
        with _translated_errors("tar"):
            member = archive.next()
        if member is None:
            return
        if member.isdir():
            kind: Literal["file", "dir", "link", "special"] = "dir"
        elif member.issym() or member.islnk():
            kind = "link"
        elif member.isreg():
            kind = "file"
        else:
            kind = "special"
        size = member.size if kind == "file" else 0
        # Allow this member's padded data plus the next member's headers, and no more.
        padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        stream.limit = min(stream.hard_limit, member.offset_data + padded + _TAR_HEADER_ALLOWANCE)
        yield _Entry(member.name, size, kind, partial(_tar_member, archive, member))


def _tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    stream = archive.extractfile(member)
    if stream is None:
        raise InvalidCalibrationSet(f"Archive member '{member.name}' has no readable data.")
    return stream


def _too_many_members(max_members: int) -> TooLarge:
    return TooLarge(
        f"The archive has more than {max_members} members; send fewer files or raise "
        "ENGINE_SERVICE_MAX_ARCHIVE_MEMBERS."
    )


def _check_entry(entry: _Entry) -> None:
    reason = unsafe_reason(entry.name)
    if reason is not None:
        raise UnsafeArchive(f"Archive member '{entry.name}' has {reason}; use relative paths in the archive.")
    if entry.kind == "link":
        raise UnsafeArchive(
            f"Archive member '{entry.name}' is a symbolic or hard link; archive the files themselves."
        )
    if entry.kind == "special":
        raise UnsafeArchive(
            f"Archive member '{entry.name}' is a device, FIFO or other special file; only regular files "
            "and directories are accepted."
        )


def _skip_reason(entry: _Entry, kind: ArchiveKind) -> str | None:
    if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
        return "not a .png, .jpg or .jpeg file"
    if entry.size > MAX_IMAGE_MEMBER_BYTES:
        raise TooLarge(
            f"Image '{entry.name}' is {entry.size} bytes, over the per-image limit of "
            f"{MAX_IMAGE_MEMBER_BYTES}; downscale or re-encode it."
        )
    with _translated_errors(kind), entry.open() as stream:
        head = stream.read(8)
    if not head.startswith(_IMAGE_SIGNATURES):
        return "named like an image but its content is not PNG or JPEG"
    return None


def _read_member(stream: IO[bytes], entry: _Entry, budget: _Budget) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(_READ_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        budget.spend(len(chunk))
        if total > entry.size:
            raise InvalidCalibrationSet(
                f"Archive member '{entry.name}' holds more data than its header declares; the archive is "
                "malformed."
            )
        chunks.append(chunk)
    return b"".join(chunks)
