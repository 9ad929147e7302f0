"""Run-time failures of a model, as the client may see them.

A runtime's message for a failed run carries its own source paths and C++ signatures
(``/onnxruntime_src/.../bfc_arena.cc:376 void* onnxruntime::BFCArena::...``): internal detail that
helps no client. :func:`model_failure` keeps what the message says about the model and drops those.
"""

from __future__ import annotations

import re

from service.errors import ModelRunFailed, ServiceError

# A source file path with an optional line number, and a C++ signature such as `void* a::B::c(size_t, ...)`.
_SOURCE_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][\w.+-]+)+\.(?:cc|cpp|cu|h|hpp|c)(?::\d+)?")
_CPP_SIGNATURE = re.compile(r"(?:[\w:<>*&]+\s+)?[\w]+(?:::[\w~]+)+\([^()]*\)(?:\s*const)?")
_SPACES = re.compile(r"\s{2,}")


def public_message(message: str) -> str:
    """``message`` without source paths and C++ signatures."""
    cleaned = _CPP_SIGNATURE.sub("", _SOURCE_PATH.sub("", message))
    return _SPACES.sub(" ", cleaned).strip()


def model_failure(exc: ServiceError) -> ModelRunFailed:
    """A server-side (5xx) failure raised while running a model, as the model's fault (422)."""
    return ModelRunFailed(
        f"The model failed while running on these inputs: {public_message(exc.message)}. Check that the "
        "inputs' shapes are what the model expects; a model that needs more memory than the server has "
        "for one request cannot run here."
    )
