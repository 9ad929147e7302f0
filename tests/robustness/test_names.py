"""Names: bounded at upload, and never copied raw into a download header.

Over real HTTP against a server process: a 200,000-character model name (finding 10) and a name
carrying a header line break are refused with a 400 that names the limit and leave nothing stored;
a name with quotes, semicolons and non-ASCII letters is stored as given and comes back in a
``Content-Disposition`` with an ASCII fallback and the exact name as RFC 5987 ``filename*``.
"""

from __future__ import annotations

import re
from email.message import Message
from urllib.parse import unquote

import httpx
import pytest

from service.api.downloads import MAX_FILENAME_CHARS, content_disposition
from tests.data_factory import classifier_samples, npz_bytes
from tests.model_factory import model_bytes, resnet_block_classifier
from tests.restart.server_process import StoredState
from tests.robustness.conftest import StartServer

pytestmark = pytest.mark.timeout(120)

MODEL = model_bytes(resnet_block_classifier(seed=11))


def filename_of(header: str) -> str | None:
    """The name a client that follows RFC 6266 uses: ``filename*`` when present, else ``filename``."""
    extended = re.search(r"filename\*=UTF-8''([^;\s]+)", header)
    if extended:
        return unquote(extended.group(1), errors="strict")
    message = Message()
    message["content-disposition"] = header
    return message.get_filename()


def refusal(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_name"
    return str(error["message"])


def test_long_or_control_character_names_are_refused_and_nothing_is_stored(
    server_process: StartServer,
) -> None:
    with server_process() as server:
        client = server.client
        message = refusal(
            client.post("/v1/models", files={"file": ("m.onnx", MODEL)}, data={"name": "n" * 200_000})
        )
        assert (
            "200000 characters" in message and "200" in message and "ENGINE_SERVICE_MAX_NAME_CHARS" in message
        )
        message = refusal(client.post("/v1/models", params={"name": "x" * 201}, content=MODEL))
        assert "201 characters" in message
        message = refusal(
            client.post(
                "/v1/models", files={"file": ("m.onnx", MODEL)}, data={"name": "a\r\nSet-Cookie: s=1"}
            )
        )
        assert "control characters" in message
        message = refusal(
            client.post(
                "/v1/calibration-sets",
                files={"file": ("c.npz", npz_bytes(input=classifier_samples(4)))},
                data={"name": "c" * 5000},
            )
        )
        assert "calibration set name" in message
        state = StoredState.read(server.data)
        assert not state.model_rows and not state.model_files and not state.calibration_rows
        assert not state.temporaries
        assert (
            client.post("/v1/models", files={"file": ("m.onnx", MODEL)}, data={"name": "n" * 200}).status_code
            == 201
        )


def test_a_hostile_name_comes_back_exactly_in_a_safe_content_disposition(server_process: StartServer) -> None:
    name = 'résumé "v2"; filename=evil.sh ../x.onnx'
    with server_process() as server:
        created = server.client.post("/v1/models", files={"file": ("m.onnx", MODEL)}, data={"name": name})
        assert created.status_code == 201 and created.json()["name"] == name
        download = server.client.get(f"/v1/models/{created.json()['id']}/onnx")
        assert download.status_code == 200 and download.content == MODEL
    header = download.headers["content-disposition"]
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert fallback.isascii() and all(char.isalnum() or char in "._-" for char in fallback)
    assert filename_of(header) == name.replace("/", "_")  # the exact name, less its path separator
    assert "\r" not in header and "\n" not in header


def test_content_disposition_is_bounded_and_keeps_the_extension() -> None:
    header = content_disposition("é" * 200_000 + ".onnx")  # a record stored before names were bounded
    assert len(header) < 12 * MAX_FILENAME_CHARS
    name = filename_of(header)
    assert name is not None and name.endswith(".onnx") and len(name) == MAX_FILENAME_CHARS
    assert content_disposition("abc-16.plan") == 'attachment; filename="abc-16.plan"'
    assert filename_of(content_disposition("\x00\n")) == "download"
