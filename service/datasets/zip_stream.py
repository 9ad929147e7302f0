"""Bounded reading of one zip member: the bytes actually inflated are counted as they are produced.

``zipfile`` inflates bzip2 members one compressed block at a time with no output bound, so a few
hundred compressed bytes can become hundreds of megabytes in one call before any caller sees them.
:class:`ZipMemberStream` reads the member's compressed bytes itself and asks the decompressor for at
most the caller's read size each time (deflate and bzip2 both take ``max_length``), so memory stays
at one read however far the data would expand. It checks, while streaming:

* the member's size from the zip header (more output than declared means the archive is malformed);
* :class:`ExpansionLimits`: bytes from one member, and the ratio of inflated to compressed bytes;
* the CRC-32 at the end (a damaged member is refused, as ``zipfile`` would).

Stored (uncompressed), deflate and bzip2 members are read; other methods are refused with a message.
"""

from __future__ import annotations

import bz2
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Protocol

from service.errors import InvalidCalibrationSet, TooLarge

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_RAW_READ = 64 * 1024
# Small members (an .npy header, a tiny image) may compress very well without being a bomb.
EXPANSION_SLACK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class ExpansionLimits:
    """Bounds on what one archive member may expand to; None leaves a bound off.

    ``member_bytes`` is ENGINE_SERVICE_MAX_ARCHIVE_MEMBER_BYTES, ``ratio`` (inflated / compressed
    bytes, past EXPANSION_SLACK_BYTES) is ENGINE_SERVICE_MAX_ARCHIVE_EXPANSION_RATIO.
    """

    member_bytes: int | None = None
    ratio: float | None = None

    def check_declared(self, name: str, size: int, compressed: int, compressed_method: bool) -> None:
        """Refuse a member whose header already declares too much (before reading any of it)."""
        self._check(name, size, compressed, compressed_method, "declares")

    def check_produced(self, name: str, produced: int, compressed: int, compressed_method: bool) -> None:
        """Refuse a member once the bytes actually inflated pass a bound."""
        self._check(name, produced, compressed, compressed_method, "expands to")

    def _check(self, name: str, size: int, compressed: int, compressed_method: bool, verb: str) -> None:
        if self.member_bytes is not None and size > self.member_bytes:
            raise TooLarge(
                f"Archive member '{name}' {verb} more than {self.member_bytes} bytes, over the limit for one "
                "member; split the data or raise ENGINE_SERVICE_MAX_ARCHIVE_MEMBER_BYTES.",
                details={"limit": "max_archive_member_bytes", "limit_bytes": self.member_bytes},
            )
        if (
            self.ratio is not None
            and compressed_method
            and size > EXPANSION_SLACK_BYTES
            and size > self.ratio * max(compressed, 1)
        ):
            raise TooLarge(
                f"Archive member '{name}' {verb} {size} bytes from {compressed} compressed bytes, more than "
                f"{self.ratio:g} times its compressed size (a decompression bomb?); send it uncompressed "
                "(numpy.savez) or raise ENGINE_SERVICE_MAX_ARCHIVE_EXPANSION_RATIO.",
                details={"limit": "max_archive_expansion_ratio", "ratio": self.ratio},
            )


UNBOUNDED_MEMBERS = ExpansionLimits()  # only the whole-archive bound applies


class _Decompressor(Protocol):
    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...

    @property
    def needs_input(self) -> bool: ...


class _Stored:
    """The identity 'decompressor' for stored members, with the same bounded-output contract."""

    def __init__(self) -> None:
        self._pending = b""

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes:
        self._pending += data
        cut = len(self._pending) if max_length < 0 else max_length
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    @property
    def needs_input(self) -> bool:
        return not self._pending


class _Deflate:
    def __init__(self) -> None:
        self._inner = zlib.decompressobj(-15)

    def decompress(self, data: bytes, max_length: int = -1, /) -> bytes:
        source = self._inner.unconsumed_tail + data
        return self._inner.decompress(source, max(max_length, 0))

    @property
    def needs_input(self) -> bool:
        return not self._inner.unconsumed_tail


def _decompressor(info: zipfile.ZipInfo) -> _Decompressor:
    if info.compress_type == zipfile.ZIP_STORED:
        return _Stored()
    if info.compress_type == zipfile.ZIP_DEFLATED:
        return _Deflate()
    if info.compress_type == zipfile.ZIP_BZIP2:
        return bz2.BZ2Decompressor()
    raise InvalidCalibrationSet(
        f"Archive member '{info.filename}' uses zip compression method {info.compress_type}; only stored, "
        "deflate and bzip2 members are read (numpy.savez and savez_compressed write those)."
    )


class ZipMemberStream:
    """A read-only stream over one member's inflated bytes, bounded as the module docstring says."""

    def __init__(self, raw: IO[bytes], info: zipfile.ZipInfo, limits: ExpansionLimits) -> None:
        self._raw = raw
        self._info = info
        self._limits = limits
        self._compressed_method = info.compress_type != zipfile.ZIP_STORED
        self._decompressor = _decompressor(info)
        self._left = info.compress_size
        self._produced = 0
        self._crc = 0
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or not header.startswith(_LOCAL_SIGNATURE):
            raise InvalidCalibrationSet(f"Archive member '{info.filename}' has a damaged local header.")
        fields = _LOCAL_HEADER.unpack(header)
        name_length, extra_length = fields[-2], fields[-1]
        self._position = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        # The expansion ratio is judged against the compressed size, so that size must be real bytes.
        if self._position + info.compress_size > raw.seek(0, 2):
            raise InvalidCalibrationSet(
                f"Archive member '{info.filename}' claims more compressed bytes than the archive holds; "
                "the archive is malformed."
            )

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` inflated bytes (all remaining, still bounded, when ``size`` is negative)."""
        if size is None or size < 0:
            parts = []
            while part := self.read(1024 * 1024):
                parts.append(part)
            return b"".join(parts)
        out = b""
        while len(out) < size and not getattr(self._decompressor, "eof", False):
            data = b""
            if self._decompressor.needs_input and self._left > 0:
                self._raw.seek(self._position)
                data = self._raw.read(min(_RAW_READ, self._left))
                if not data:
                    raise InvalidCalibrationSet(f"Archive member '{self._info.filename}' is truncated.")
                self._position += len(data)
                self._left -= len(data)
            elif self._decompressor.needs_input:
                break
            try:
                chunk = self._decompressor.decompress(data, size - len(out))
            except (zlib.error, OSError, EOFError) as exc:
                raise InvalidCalibrationSet(
                    f"Archive member '{self._info.filename}' is damaged ({exc})."
                ) from exc
            self._account(chunk)
            out += chunk
        if not out:
            self._finish()
        return out

    def _account(self, chunk: bytes) -> None:
        self._produced += len(chunk)
        self._crc = zlib.crc32(chunk, self._crc)
        if self._produced > self._info.file_size:
            raise InvalidCalibrationSet(
                f"Archive member '{self._info.filename}' holds more data than its header declares; the "
                "archive is malformed."
            )
        self._limits.check_produced(
            self._info.filename, self._produced, self._info.compress_size, self._compressed_method
        )

    def _finish(self) -> None:
        if self._produced == self._info.file_size and self._crc != self._info.CRC:
            raise InvalidCalibrationSet(
                f"Archive member '{self._info.filename}' fails its CRC check; it is damaged."
            )

    def close(self) -> None:
        """Nothing to release: the archive file belongs to the caller."""

    def __enter__(self) -> ZipMemberStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
