"""The content-addressed blob store: atomic writes, verification, no leftovers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.errors import CorruptBlob, NotFound, TooLarge
from service.store.blobs import BlobStore


def test_put_bytes_stores_under_the_sha256_and_reads_back(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, suffix=".bin")
    blob = store.put_bytes(b"engine bytes")
    assert blob.sha256 == hashlib.sha256(b"engine bytes").hexdigest()
    assert blob.path == tmp_path / blob.sha256[:2] / f"{blob.sha256}.bin"
    assert store.read_bytes(blob.sha256) == b"engine bytes"
    assert store.verify(blob.sha256)
    assert list(store.digests()) == [blob.sha256]


def test_chunks_over_the_limit_raise_too_large_and_leave_no_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(TooLarge, match="size limit of 10 bytes"):
        store.put_chunks([b"12345", b"678901"], max_bytes=10)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_damaged_file_is_detected_and_never_returned(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    blob = store.put_bytes(b"x" * 1000)
    blob.path.write_bytes(b"x" * 999)
    assert not store.verify(blob.sha256)
    with pytest.raises(CorruptBlob):
        store.read_bytes(blob.sha256)


def test_temporaries_left_by_a_crash_are_swept_on_open(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    staged = store.stage(max_bytes=100)
    staged.write(b"half")  # the process "dies" here: no commit, no discard
    assert staged.path.exists()
    BlobStore(tmp_path)
    assert not staged.path.exists()


def test_unknown_and_malformed_digests_are_not_found(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(NotFound):
        store.read_bytes("0" * 64)
    with pytest.raises(NotFound, match="not a sha256"):
        store.path_for("../../etc/passwd")
