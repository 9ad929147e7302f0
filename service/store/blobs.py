"""Content-addressed blob store with atomic writes.

A blob lives at ``<root>/<sha[:2]>/<sha><suffix>``. Writes go to a temporary file in the same
directory as the final file, are fsynced, then renamed: a crash leaves at worst a ``.tmp-*`` file,
never a partial blob under a real name, and stale temporaries are swept on open. Reads can verify
the digest so a file damaged on disk is never served.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from service.errors import CorruptBlob, NotFound, TooLarge

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size_bytes: int
    path: Path


class StagedUpload:
    """An upload being written to a temporary file, hashed and size-checked as it streams."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size_bytes = 0
        self.max_bytes = max_bytes

    def write(self, chunk: bytes) -> None:
        self.size_bytes += len(chunk)
        if self.size_bytes > self.max_bytes:
            raise TooLarge(
                f"The upload exceeds the size limit of {self.max_bytes} bytes; send a smaller file."
            )
        self._hash.update(chunk)
        self._file.write(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def finish(self) -> None:
        """Flush and fsync; the file stays at ``path`` until committed or discarded."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        with suppress(FileNotFoundError):
            self.path.unlink()


class BlobStore:
    """Blobs addressed by sha256 under one root directory."""

    def __init__(self, root: Path, suffix: str = "") -> None:
        self.root = root
        self.suffix = suffix
        root.mkdir(parents=True, exist_ok=True)
        self.sweep_temporaries()

    def path_for(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise NotFound(f"'{sha256}' is not a sha256 hex digest.")
        return self.root / sha256[:2] / f"{sha256}{self.suffix}"

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def stage(self, max_bytes: int) -> StagedUpload:
        """Start a streamed write; commit it with :meth:`commit` or throw it away with ``discard``."""
        return StagedUpload(self.root, max_bytes)

    def commit(self, staged: StagedUpload) -> StoredBlob:
        """Move a finished upload under its digest (idempotent when the blob already exists)."""
        staged.finish()
        target = self.path_for(staged.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)
        _fsync_dir(target.parent)
        return StoredBlob(staged.sha256, staged.size_bytes, target)

    def put_bytes(self, data: bytes) -> StoredBlob:
        staged = self.stage(max_bytes=len(data))
        try:
            staged.write(data)
            return self.commit(staged)
        except BaseException:
            staged.discard()
            raise

    def put_chunks(self, chunks: Iterable[bytes], max_bytes: int) -> StoredBlob:
        staged = self.stage(max_bytes)
        try:
            for chunk in chunks:
                staged.write(chunk)
            return self.commit(staged)
        except BaseException:
            staged.discard()
            raise

    async def put_async_chunks(self, chunks: AsyncIterator[bytes], max_bytes: int) -> StoredBlob:
        staged = self.stage(max_bytes)
        try:
            async for chunk in chunks:
                staged.write(chunk)
            return self.commit(staged)
        except BaseException:
            staged.discard()
            raise

    def read_bytes(self, sha256: str, *, verify: bool = True) -> bytes:
        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"No stored blob {sha256}.") from exc
        if verify and hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptBlob(f"{path} does not match its sha256 {sha256}.")
        return data

    def verify(self, sha256: str) -> bool:
        """True when the file exists and hashes to its name."""
        path = self.path_for(sha256)
        if not path.is_file():
            return False
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    @contextmanager
    def open(self, sha256: str) -> Iterator[BinaryIO]:
        path = self.path_for(sha256)
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"No stored blob {sha256}.") from exc
        with handle:
            yield handle

    def delete(self, sha256: str) -> None:
        with suppress(FileNotFoundError):
            self.path_for(sha256).unlink()

    def digests(self) -> Iterator[str]:
        """Every stored digest (for reconciling the index with the files)."""
        for path in self.root.glob(f"??/*{self.suffix}"):
            name = path.name[: len(path.name) - len(self.suffix)] if self.suffix else path.name
            if _SHA256.match(name):
                yield name

    def sweep_temporaries(self) -> int:
        """Remove temporaries left by a crash mid-write; returns how many were removed."""
        removed = 0
        for path in list(self.root.glob(f"{_TMP_PREFIX}*")) + list(self.root.glob(f"??/{_TMP_PREFIX}*")):
            with suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX: the directory entry must be synced too)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
