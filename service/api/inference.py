"""Inference: POST /v1/engines/{id}/infer in JSON, npz or raw tensor bytes (see service.serving.codecs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.api.body_limits import BINARY_DECODE_FACTOR, JSON_DECODE_FACTOR
from service.api.deps import current_principal
from service.api.tenancy import owned_engine
from service.errors import ServiceError, TooLarge
from service.reports.synthetic_inputs import TensorBudget
from service.services import Services
from service.serving.body_budget import BodyBudget, BodyLease
from service.serving.codecs import (
    DEFAULT_MAX_INFERENCE_BYTES,
    DTYPE_HEADER,
    JSON_MEDIA,
    NPZ_MEDIA,
    RAW_MEDIA,
    SHAPE_HEADER,
    EncodedOutputs,
    WireFormat,
    check_output_choice,
    decode_inputs,
    encode_outputs,
    request_format,
    response_format,
)
from service.serving.failures import model_failure
from service.serving.validation import validate_feeds
from service.store.owners import Principal

router = APIRouter(prefix="/v1/engines", tags=["inference"])

_BODY_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            JSON_MEDIA: {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {"inputs": {"type": "object", "additionalProperties": {"type": "array"}}},
                }
            },
            NPZ_MEDIA: {"schema": {"type": "string", "format": "binary"}},
            RAW_MEDIA: {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": DTYPE_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": f"numpy dtype of a {RAW_MEDIA} body, e.g. float32",
        },
        {
            "name": SHAPE_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": f"shape of a {RAW_MEDIA} body, comma-separated, e.g. 1,3,224,224",
        },
    ],
}


async def read_body(
    request: Request,
    limit: int,
    setting: str = "ENGINE_SERVICE_MAX_UPLOAD_BYTES",
    *,
    lease: BodyLease | None = None,
    decode_factor: int = BINARY_DECODE_FACTOR,
) -> bytes:
    """The request body, refused with TooLarge (naming ``setting``) as soon as it passes ``limit`` bytes.

    With a ``lease``, the bytes the body will cost once decoded (``decode_factor`` times its size)
    are held in the server's shared body budget: up front when the length is declared, else as
    the chunks arrive (waiting a bounded time, then ServerBusy, when the budget is spent).
    """
    advice = f"send a smaller batch or raise {setting}"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(
            f"The request declares {declared} bytes; this inference request may hold {limit}; {advice}."
        )
    if lease is not None and declared is not None and declared.isdigit():
        await lease.ensure(int(declared) * decode_factor)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(
                f"The request body passed {limit} bytes, the most this inference request may hold; {advice}."
            )
        if lease is not None:
            await lease.ensure(size * decode_factor)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def run_inference(
    services: Services,
    principal: Principal,
    engine_id: str,
    fmt: WireFormat,
    body: bytes,
    headers: Mapping[str, str],
    answer: WireFormat,
    chosen: str | None,
) -> EncodedOutputs:
    """Decode, validate, infer and encode, holding the engine's warm runner for the duration."""
    engine_id = owned_engine(services, principal, engine_id).id  # another key's engine is a 404
    pool = services.runner_pool
    with pool.lease(engine_id) as runner:
        check_output_choice(answer, [spec.name for spec in runner.outputs], chosen)
        raw = decode_inputs(fmt, body, headers, [spec.name for spec in runner.inputs])
        feeds = validate_feeds(raw, runner.inputs, allow_safe_casts=fmt == "json")
        budget = TensorBudget(one_input=services.settings.max_input_tensor_bytes)
        for name, array in feeds.items():
            budget.check_input(name, array.shape, array.nbytes)
        try:
            outputs = runner.infer(feeds)
        except ServiceError as exc:
            if exc.status < 500:
                raise
            raise model_failure(exc) from exc
    metadata = None
    if answer == "json":
        record = services.engines.get(engine_id)
        metadata = {"engine_id": record.id, "backend": record.backend, "precision": record.precision}
    return encode_outputs(outputs, answer, chosen=chosen, metadata=metadata)


@router.post(
    "/{engine_id}/infer",
    openapi_extra=_BODY_SCHEMA,
    responses={
        200: {
            "content": {JSON_MEDIA: {}, NPZ_MEDIA: {}, RAW_MEDIA: {}},
            "description": "The outputs, in the request's format or the one Accept names.",
        },
        400: {"description": "Inputs do not match the engine (names, dtypes, shapes), or a malformed body."},
        409: {"description": "The engine's backend cannot run on this host; the message names one that can."},
        413: {"description": "The body is larger than an inference request may be."},
    },
)
async def infer_engine(engine_id: str, request: Request, output: str | None = None) -> Response:
    """Run the engine on one batch: JSON, npz or raw tensor bytes in; the same (or what Accept asks) out."""
    # The services are read from the app directly rather than through the sync ServicesDep dependency,
    # which FastAPI would run in the thread pool: one thread hop less on the latency-critical path.
    services: Services = request.app.state.services
    principal = current_principal(request)
    fmt = request_format(request.headers.get("content-type"))
    answer = response_format(request.headers.get("accept"), fmt)
    settings = services.settings
    budget: BodyBudget = request.app.state.body_budget
    factor = JSON_DECODE_FACTOR if fmt == "json" else BINARY_DECODE_FACTOR
    with budget.lease() as lease:  # held until the outputs are encoded: the decoded inputs live that long
        if fmt == "json" and settings.max_json_infer_bytes < min(
            settings.max_upload_bytes, DEFAULT_MAX_INFERENCE_BYTES
        ):
            body = await read_body(
                request,
                settings.max_json_infer_bytes,
                "ENGINE_SERVICE_MAX_JSON_INFER_BYTES",
                lease=lease,
                decode_factor=factor,
            )
        else:
            limit = min(settings.max_upload_bytes, DEFAULT_MAX_INFERENCE_BYTES)
            body = await read_body(request, limit, lease=lease, decode_factor=factor)
        encoded = await run_in_threadpool(
            run_inference, services, principal, engine_id, fmt, body, request.headers, answer, output
        )
        del body
    return Response(content=encoded.body, media_type=encoded.media_type, headers=dict(encoded.headers))
