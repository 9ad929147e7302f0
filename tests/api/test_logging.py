"""Request ids and structured logs: echoed ids, access lines with key ids, JSON lines, 500s with ids."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.observability.logging import (
    JsonFormatter,
    RequestContextFilter,
    bind_key_id,
    configure_logging,
    current_request_id,
    request_scope,
)
from tests.auth.probe_routes import probe_server
from tests.server import running_server, settings_for

KEY = "logging-tests-key-" + "l" * 24
ACCESS = "service.access"


def _access_records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    """The access lines of one request; the server writes them just after the response, so wait a little."""
    deadline = time.monotonic() + 5
    while True:
        found = [
            r for r in caplog.records if r.name == ACCESS and getattr(r, "request_id", None) == request_id
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


@pytest.fixture
def root_handlers_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_request_id_is_generated_and_echoed(api: httpx.Client) -> None:
    first = api.get("/healthz").headers["x-request-id"]
    second = api.get("/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first) and first != second


def test_a_sane_incoming_request_id_is_honoured(api: httpx.Client) -> None:
    request_id = f"client-{uuid.uuid4()}:try=1"
    assert api.get("/healthz", headers={"X-Request-ID": request_id}).headers["x-request-id"] == request_id


@pytest.mark.parametrize("incoming", ["x" * 129, "has space", 'quote"s', "<script>", "ü-umlaut"])
def test_an_unsafe_incoming_request_id_is_replaced(api: httpx.Client, incoming: str) -> None:
    response = api.get("/healthz", headers={"X-Request-ID": incoming.encode("utf-8")})
    echoed = response.headers["x-request-id"]
    assert echoed != incoming and re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_the_access_line_carries_request_id_method_path_status_and_duration(
    api: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    request_id = f"access-{uuid.uuid4().hex}"
    model_id = "c" * 64
    assert api.get(f"/v1/models/{model_id}", headers={"X-Request-ID": request_id}).status_code == 404
    (record,) = _access_records(caplog, request_id)
    assert record.getMessage().startswith(f"GET /v1/models/{model_id} 404 ")
    assert (record.method, record.path, record.route, record.status) == (  # type: ignore[attr-defined]
        "GET",
        f"/v1/models/{model_id}",
        "/v1/models/{model_id}",
        404,
    )
    assert record.duration_ms >= 0  # type: ignore[attr-defined]
    assert record.key_id is None  # type: ignore[attr-defined]  # auth is off on the shared server


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("logging")
    settings = settings_for(root, auth_enabled=True, bootstrap_api_key=KEY, max_upload_bytes=100)
    with probe_server(settings) as client:
        yield client


def test_answers_given_before_routing_still_carry_the_request_id(
    secured: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    unauthorized = secured.get("/v1/models", headers={"X-Request-ID": "rid-401"})
    too_large = secured.post(
        "/v1/models",
        content=b"\0" * 1000,
        headers={"X-Request-ID": "rid-413", "X-API-Key": KEY, "content-type": "application/octet-stream"},
    )
    assert (unauthorized.status_code, unauthorized.headers["x-request-id"]) == (401, "rid-401")
    assert (too_large.status_code, too_large.headers["x-request-id"]) == (413, "rid-413")
    assert _access_records(caplog, "rid-401")[0].key_id is None  # type: ignore[attr-defined]
    assert _access_records(caplog, "rid-413")[0].key_id == "bootstrap"  # type: ignore[attr-defined]


def test_an_unhandled_error_answers_json_500_with_the_request_id_and_logs_it(
    secured: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    response = secured.get("/_test/fail", headers={"X-API-Key": KEY, "X-Request-ID": "rid-500"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "rid-500"
    body = response.json()["error"]
    assert body["code"] == "internal_error" and "rid-500" in body["message"]
    errors = [r for r in caplog.records if r.name == "service.api.middleware" and r.exc_info]
    assert errors and "deliberate failure" in caplog.text
    (access,) = _access_records(caplog, "rid-500")
    assert access.status == 500  # type: ignore[attr-defined]


def test_json_log_lines_parse_and_carry_the_request_fields(
    tmp_path_factory: pytest.TempPathFactory, root_handlers_restored: None
) -> None:
    settings = settings_for(
        tmp_path_factory.mktemp("json-logs"), auth_enabled=True, bootstrap_api_key=KEY, log_json=True
    )
    with probe_server(settings) as client:
        assert (
            client.get("/v1/models", headers={"X-API-Key": KEY, "X-Request-ID": "rid-json"}).status_code
            == 200
        )
    assert settings.log_file is not None
    lines = [line for line in settings.log_file.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    (access,) = [r for r in records if r["logger"] == ACCESS and r["request_id"] == "rid-json"]
    assert access["key_id"] == "bootstrap"
    assert (access["method"], access["path"], access["route"], access["status"]) == (
        "GET",
        "/v1/models",
        "/v1/models",
        200,
    )
    assert access["level"] == "INFO" and access["time"].endswith("+00:00")
    assert isinstance(access["duration_ms"], float)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)


def test_records_inside_a_request_scope_get_its_ids_and_outside_get_dashes() -> None:
    record_filter = RequestContextFilter()

    def record() -> logging.LogRecord:
        made = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
        record_filter.filter(made)
        return made

    with request_scope("rid-unit"):
        bind_key_id("key_abc")
        inside = record()
        assert current_request_id() == "rid-unit"
    outside = record()
    assert (inside.request_id, inside.key_id) == ("rid-unit", "key_abc")  # type: ignore[attr-defined]
    assert (outside.request_id, outside.key_id) == ("-", "-")  # type: ignore[attr-defined]
    assert current_request_id() is None


def test_json_formatter_keeps_extras_and_the_exception() -> None:
    try:
        raise ValueError("bad scale")
    except ValueError:
        made = logging.LogRecord("svc", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    made.job_id = "j1"  # as passed with extra=
    with request_scope("rid-fmt"):
        line = json.loads(JsonFormatter().format(made))
    assert (line["message"], line["level"], line["job_id"], line["request_id"]) == (
        "failed x",
        "ERROR",
        "j1",
        "rid-fmt",
    )
    assert "ValueError: bad scale" in line["exception"]


def test_configuring_twice_leaves_one_service_handler(root_handlers_restored: None) -> None:
    configure_logging("debug", json_lines=True)
    handler = configure_logging("WARNING", json_lines=False)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_engine_service_handler", False)]
    assert ours == [handler]
    assert root.level == logging.WARNING
    assert logging.getLogger("uvicorn.access").disabled


def test_the_service_logs_to_its_log_file_and_not_between_the_test_output(
    tmp_path_factory: pytest.TempPathFactory, capfd: pytest.CaptureFixture[str], root_handlers_restored: None
) -> None:
    settings = settings_for(tmp_path_factory.mktemp("file-logs"))
    with running_server(settings) as client:
        assert client.get("/healthz", headers={"X-Request-ID": "rid-file"}).status_code == 200
        deadline = time.monotonic() + 5
        assert settings.log_file is not None
        while "rid-file" not in _read(settings.log_file) and time.monotonic() < deadline:
            time.sleep(0.01)
    written = _read(settings.log_file)
    assert re.search(r"INFO +service\.access \[rid-file\] GET /healthz 200", written), written
    out, err = capfd.readouterr()
    assert "service.access" not in out + err and "rid-file" not in out + err


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_without_a_log_file_the_service_logs_to_stderr(
    capsys: pytest.CaptureFixture[str], root_handlers_restored: None
) -> None:
    configure_logging("INFO", json_lines=False)
    logging.getLogger("service.test").info("to stderr")
    assert "INFO    service.test [-] to stderr" in capsys.readouterr().err


def test_an_unknown_log_level_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown log level 'chatty'.*DEBUG, INFO"):
        configure_logging("chatty", json_lines=False)
