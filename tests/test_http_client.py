"""The HTTP client core both clients share: error bodies, the atomic verified writer, retries."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.errors import ApiUnreachable, DownloadDamaged
from service.http_client import call_with_retries, error_fields, write_verified


def test_error_fields_read_the_service_error_body_and_nothing_else() -> None:
    answer = httpx.Response(404, json={"error": {"code": "not_found", "message": "No model 'x'."}})
    assert error_fields(answer) == ("not_found", "No model 'x'.")
    assert error_fields(httpx.Response(404, json={"detail": "Not Found"})) is None
    assert error_fields(httpx.Response(502, text="<html>bad gateway</html>")) is None


def test_a_checked_write_appears_whole_with_its_digest(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "engine.plan"
    written = write_verified([b"abc", b"def"], target, lambda sha, size: None)
    assert target.read_bytes() == b"abcdef"
    assert (written.sha256, written.size_bytes) == (hashlib.sha256(b"abcdef").hexdigest(), 6)
    assert [path.name for path in target.parent.iterdir()] == ["engine.plan"]


def test_a_refused_write_leaves_nothing_and_keeps_an_older_file(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")

    def refuse(sha256: str, size: int) -> None:
        raise DownloadDamaged(f"received {size} bytes")

    with pytest.raises(DownloadDamaged, match="received 3 bytes"):
        write_verified([b"new"], target, refuse)
    assert target.read_bytes() == b"old"
    assert [path.name for path in tmp_path.iterdir()] == ["model.onnx"]


def test_an_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"part"
        raise httpx.ReadError("connection reset")

    with pytest.raises(httpx.ReadError):
        write_verified(chunks(), tmp_path / "set.npz")
    assert list(tmp_path.iterdir()) == []


def test_retries_end_with_what_give_up_makes_of_the_last_failure() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise httpx.ConnectError("refused")
        return "ok"

    def give_up(exc: BaseException) -> ApiUnreachable:
        return ApiUnreachable(f"gave up: {exc}")

    assert (
        call_with_retries(flaky, retry_seconds=5, transient=(httpx.ConnectError,), give_up=give_up, what="x")
        == "ok"
    )
    assert len(calls) == 2

    def down() -> str:
        raise httpx.ConnectError("refused")

    with pytest.raises(ApiUnreachable, match="gave up: refused") as raised:
        call_with_retries(down, retry_seconds=0, transient=(httpx.ConnectError,), give_up=give_up, what="x")
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
