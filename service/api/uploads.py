"""Streaming uploads: a multipart ``file`` field or a raw ``application/octet-stream`` body.

Bytes go straight into a staged blob that hashes and size-checks as it writes, so an oversized
upload stops at the limit and a failed one leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from service.errors import BadInput, TooLarge
from service.store.blobs import BlobStore, StagedUpload

CHUNK = 1024 * 1024
MULTIPART_OVERHEAD = 1024 * 1024  # headers and small form fields around the file part


@dataclass
class Upload:
    staged: StagedUpload
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


def upload_body_schema(extra_fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAPI text for an endpoint that takes either upload form."""
    properties: dict[str, Any] = {"file": {"type": "string", "format": "binary"}}
    properties.update(extra_fields or {})
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": properties, "required": ["file"]}
                },
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


async def receive_upload(request: Request, blobs: BlobStore, max_bytes: int) -> Upload:
    """Stream the request's file into a staged blob; the caller commits or discards it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + MULTIPART_OVERHEAD:
        raise TooLarge(f"The upload declares {declared} bytes; the limit is {max_bytes} bytes.")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _receive_multipart(request, blobs, max_bytes)
    if content_type and not content_type.startswith(("application/octet-stream", "application/x-")):
        raise BadInput(
            f"Unsupported Content-Type '{content_type}': send multipart/form-data with a 'file' field, "
            "or the raw bytes as application/octet-stream."
        )
    staged = blobs.stage(max_bytes)
    try:
        async for chunk in request.stream():
            staged.write(chunk)
        if staged.size_bytes == 0:
            raise BadInput("The request body is empty: send the file's bytes.")
        staged.finish()
    except BaseException:
        staged.discard()
        raise
    return Upload(staged=staged, filename=request.query_params.get("name"))


async def _receive_multipart(request: Request, blobs: BlobStore, max_bytes: int) -> Upload:
    form = await request.form(max_files=1, max_fields=20)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise BadInput("The multipart form has no file field named 'file'.")
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        staged = blobs.stage(max_bytes)
        try:
            while chunk := await upload.read(CHUNK):
                staged.write(chunk)
            if staged.size_bytes == 0:
                raise BadInput("The uploaded file is empty.")
            staged.finish()
        except BaseException:
            staged.discard()
            raise
        return Upload(staged=staged, filename=upload.filename, fields=fields)
    finally:
        await form.close()
