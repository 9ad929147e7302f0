"""API keys over real HTTP: every route is covered, health is open, keys are hashed, limits hold per key."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from starlette.websockets import WebSocketDisconnect

from service.app import create_app
from service.auth.keys import BOOTSTRAP_KEY_ID, KeyStore, generate_token, hash_token
from service.config import Settings
from service.store.db import Database
from tests.auth.probe_routes import RELEASE, probe_server, wait_until_idle
from tests.model_factory import model_bytes, resnet_block_classifier, two_input_adder
from tests.server import running_server, settings_for

BOOTSTRAP = "bootstrap-" + "k" * 30
GLOBAL_UPLOAD_LIMIT = 4096
GLOBAL_JOB_LIMIT = 2
PUBLIC = {"/healthz", "/readyz"}
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
MODEL = model_bytes(resnet_block_classifier(seed=41))  # about 10 KiB: above the global limit
TINY_MODEL = model_bytes(two_input_adder())  # under 1 KiB
RAW = {"content-type": "application/octet-stream"}


@dataclass(frozen=True)
class AuthServer:
    client: httpx.Client
    settings: Settings
    root: Path

    def key(self, name: str, **limits: int) -> tuple[str, str]:
        """Create a key the way the CLI does (another connection to the same database): (id, token)."""
        db = Database(self.settings.database_path)
        try:
            issued = KeyStore(db).create(name, **limits)
        finally:
            db.close()
        return issued.key.id, issued.token

    def revoke(self, key_id: str) -> None:
        db = Database(self.settings.database_path)
        try:
            KeyStore(db).revoke(key_id)
        finally:
            db.close()

    def stored_models(self) -> set[Path]:
        return {p for p in (self.root / "models").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    root = tmp_path_factory.mktemp("auth-server")
    settings = settings_for(
        root,
        auth_enabled=True,
        bootstrap_api_key=BOOTSTRAP,
        max_upload_bytes=GLOBAL_UPLOAD_LIMIT,
        max_concurrent_jobs_per_key=GLOBAL_JOB_LIMIT,
    )
    RELEASE.set()
    with probe_server(settings) as client:
        try:
            yield AuthServer(client, settings, root)
        finally:
            RELEASE.set()  # let probe jobs finish so the server stops without waiting out its grace period


def _operations() -> list[tuple[str, str]]:
    """Every (method, path template) of the production app, from its routes, so new routers are covered."""
    app = create_app(Settings(_env_file=None, auth_enabled=True))  # type: ignore[call-arg]
    operations = {
        (method.upper(), path)
        for path, item in app.openapi()["paths"].items()
        for method in item
        if method.upper() in HTTP_METHODS
    }
    for route in app.routes:  # routes outside the schema: /openapi.json, /docs, /redoc...
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if isinstance(path, str) and methods:
            operations.update((m, path) for m in methods if m in HTTP_METHODS)
    return sorted(operations)


def _concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "0" * 64, template)


def _status_codes(client: httpx.Client, headers: dict[str, str]) -> dict[tuple[str, str], int]:
    return {
        (method, path): client.request(method, _concrete(path), headers=headers).status_code
        for method, path in _operations()
        if path not in PUBLIC
    }


def test_route_enumeration_sees_every_router_and_the_docs() -> None:
    templates = {path for _, path in _operations()}
    assert {"/v1/models", "/v1/models/{model_id}", "/metrics", "/openapi.json", "/docs"} <= templates
    assert templates >= PUBLIC


def test_every_route_but_health_answers_401_without_a_key(server: AuthServer) -> None:
    codes = _status_codes(server.client, {})
    assert codes and {op: c for op, c in codes.items() if c != 401} == {}


def test_every_route_but_health_answers_401_to_an_unknown_key(server: AuthServer) -> None:
    codes = _status_codes(server.client, {"X-API-Key": generate_token()})
    assert codes and {op: c for op, c in codes.items() if c != 401} == {}


def test_every_route_but_health_answers_401_to_a_revoked_key(server: AuthServer) -> None:
    key_id, token = server.key("soon revoked")
    assert server.client.get("/v1/models", headers={"X-API-Key": token}).status_code == 200
    server.revoke(key_id)
    codes = _status_codes(server.client, {"Authorization": f"Bearer {token}"})
    assert codes and {op: c for op, c in codes.items() if c != 401} == {}


def test_health_endpoints_are_open_without_a_key(server: AuthServer) -> None:
    assert server.client.get("/healthz").json() == {"status": "ok"}
    assert server.client.get("/readyz").status_code != 401


def test_a_401_says_how_to_send_a_key_and_names_the_scheme(server: AuthServer) -> None:
    response = server.client.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json() == {
        "error": {
            "code": "unauthorized",
            "message": "This endpoint needs an API key: send it as 'X-API-Key: <key>' or "
            "'Authorization: Bearer <key>'.",
        }
    }


def test_revoked_and_unknown_keys_are_answered_identically(server: AuthServer) -> None:
    key_id, token = server.key("revoked for comparison")
    server.revoke(key_id)
    revoked = server.client.get("/v1/models", headers={"X-API-Key": token})
    unknown = server.client.get("/v1/models", headers={"X-API-Key": generate_token()})
    assert revoked.status_code == unknown.status_code == 401
    assert revoked.json() == unknown.json()
    assert "not accepted" in revoked.json()["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": BOOTSTRAP},
        {"x-api-key": BOOTSTRAP},
        {"Authorization": f"Bearer {BOOTSTRAP}"},
        {"authorization": f"bearer   {BOOTSTRAP}"},
    ],
    ids=["x-api-key", "x-api-key-lowercase", "bearer", "bearer-lowercase"],
)
def test_both_header_forms_are_accepted(server: AuthServer, headers: dict[str, str]) -> None:
    assert server.client.get("/v1/models", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": f"Basic {BOOTSTRAP}"}, {"Authorization": BOOTSTRAP}, {"X-API-Key": ""}],
    ids=["basic-scheme", "no-scheme", "empty"],
)
def test_other_credential_forms_are_not_keys(server: AuthServer, headers: dict[str, str]) -> None:
    response = server.client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert "needs an API key" in response.json()["error"]["message"]


def test_a_key_created_with_the_keys_module_works_at_once_and_revocation_too(server: AuthServer) -> None:
    key_id, token = server.key("created while running")
    assert server.client.get("/v1/models", headers={"X-API-Key": token}).status_code == 200
    server.revoke(key_id)
    assert server.client.get("/v1/models", headers={"X-API-Key": token}).status_code == 401


def test_the_database_holds_key_hashes_and_no_plaintext(server: AuthServer) -> None:
    _, token = server.key("at rest")
    assert server.client.get("/v1/models", headers={"X-API-Key": token}).status_code == 200
    path = server.settings.database_path
    stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())
    assert hash_token(BOOTSTRAP).encode() in stored and hash_token(token).encode() in stored
    assert BOOTSTRAP.encode() not in stored and token.encode() not in stored


def test_openapi_declares_the_key_schemes_and_leaves_health_open(server: AuthServer) -> None:
    schema = server.client.get("/openapi.json", headers={"X-API-Key": BOOTSTRAP}).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["BearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert {"APIKeyHeader": []} in schema["security"]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert schema["paths"]["/readyz"]["get"]["security"] == []
    assert "401" in schema["paths"]["/v1/models"]["post"]["responses"]


def test_with_auth_off_no_key_is_needed_and_the_schema_declares_none(api: httpx.Client) -> None:
    assert api.get("/v1/models").status_code == 200
    assert "securitySchemes" not in api.get("/openapi.json").json().get("components", {})


def _upload_raw(server: AuthServer, token: str, data: bytes) -> httpx.Response:
    return server.client.post(
        "/v1/models", content=data, params={"name": "m.onnx"}, headers={**RAW, "X-API-Key": token}
    )


def _upload_multipart(server: AuthServer, token: str, data: bytes) -> httpx.Response:
    return server.client.post("/v1/models", files={"file": ("m.onnx", data)}, headers={"X-API-Key": token})


def test_a_keys_lower_upload_limit_answers_413_and_stores_nothing(server: AuthServer) -> None:
    _, token = server.key("small uploads", max_upload_bytes=1000)
    before = server.stored_models()
    chunks = [MODEL[i : i + 1024] for i in range(0, len(MODEL), 1024)]
    answers = {
        "raw": _upload_raw(server, token, MODEL),
        "multipart": _upload_multipart(server, token, MODEL),
        "chunked": server.client.post(  # no Content-Length: only the streaming count can stop it
            "/v1/models", content=iter(chunks), headers={**RAW, "X-API-Key": token}
        ),
    }
    for form, response in answers.items():
        assert response.status_code == 413, (form, response.text)
        assert response.json()["error"]["code"] == "too_large"
    assert "limit of 1000 bytes for API key 'small uploads'" in answers["raw"].json()["error"]["message"]
    assert "limit of 1000 bytes for API key" in answers["chunked"].json()["error"]["message"]
    assert server.stored_models() == before
    assert not list((server.root / "models").rglob(".tmp-*"))
    assert _upload_multipart(server, token, TINY_MODEL).status_code == 201  # under the key's limit


def test_a_keys_higher_upload_limit_lifts_the_global_one(server: AuthServer) -> None:
    assert len(MODEL) > GLOBAL_UPLOAD_LIMIT
    refused = _upload_raw(server, BOOTSTRAP, MODEL)
    assert refused.status_code == 413
    assert "ENGINE_SERVICE_MAX_UPLOAD_BYTES" in refused.json()["error"]["message"]
    _, token = server.key("large uploads", max_upload_bytes=1_000_000)
    assert _upload_raw(server, token, MODEL).status_code in (200, 201)
    assert _upload_multipart(server, token, MODEL).status_code in (200, 201)


def test_the_key_upload_limit_is_exact_for_raw_bodies(server: AuthServer) -> None:
    _, exact = server.key("exact", max_upload_bytes=len(TINY_MODEL))
    _, short = server.key("one byte short", max_upload_bytes=len(TINY_MODEL) - 1)
    assert _upload_raw(server, exact, TINY_MODEL).status_code in (200, 201)
    assert _upload_raw(server, short, TINY_MODEL).status_code == 413
    assert _upload_multipart(server, short, TINY_MODEL).status_code == 413


def test_a_keys_concurrent_job_limit_answers_429(server: AuthServer) -> None:
    one_id, one = server.key("one job at a time", max_concurrent_jobs=1)
    RELEASE.clear()
    try:
        first = server.client.post("/_test/jobs", headers={"X-API-Key": one})
        assert first.status_code == 202 and first.json()["owner"] == one_id
        second = server.client.post("/_test/jobs", headers={"X-API-Key": one})
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "limit_exceeded"
        assert "(limit 1)" in second.json()["error"]["message"]
        # The same rule and answer as the local owner's bound with auth off: when to retry, what to raise.
        assert int(second.headers["retry-after"]) > 0
        assert "ENGINE_SERVICE_MAX_CONCURRENT_JOBS_PER_KEY" in second.json()["error"]["message"]

        bootstrap = {"Authorization": f"Bearer {BOOTSTRAP}"}
        owners = [server.client.post("/_test/jobs", headers=bootstrap).json()["owner"] for _ in range(2)]
        assert owners == [BOOTSTRAP_KEY_ID, BOOTSTRAP_KEY_ID]
        third = server.client.post("/_test/jobs", headers=bootstrap)
        assert third.status_code == 429
        assert f"(limit {GLOBAL_JOB_LIMIT})" in third.json()["error"]["message"]
    finally:
        RELEASE.set()
    wait_until_idle(server.client, {"X-API-Key": BOOTSTRAP})
    assert server.client.post("/_test/jobs", headers={"X-API-Key": one}).status_code == 202


def test_a_keys_file_adds_keys_next_to_the_database(tmp_path: Path) -> None:
    file_token = generate_token()
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# scrapers\nprometheus:{file_token}\n", encoding="utf-8")
    settings = settings_for(tmp_path / "srv", auth_enabled=True, api_keys_file=keys_file)
    with running_server(settings) as client:
        assert client.get("/metrics", headers={"Authorization": f"Bearer {file_token}"}).status_code == 200
        assert client.get("/metrics").status_code == 401
        db = Database(settings.database_path)
        try:
            assert KeyStore(db).list() == []  # file keys live in memory, not in the database
            token = KeyStore(db).create("db key").token
        finally:
            db.close()
        assert client.get("/v1/models", headers={"X-API-Key": token}).status_code == 200


# uvicorn ends its thread with SystemExit when start-up fails; that is the behaviour under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unusable_keys_file_stops_the_server_from_starting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("tiny\n", encoding="utf-8")
    settings = settings_for(tmp_path / "srv", auth_enabled=True, api_keys_file=keys_file)
    with pytest.raises(RuntimeError, match="did not start"), running_server(settings):
        pass
    assert "keys.txt:1 must be at least 20 printable characters" in caplog.text


def _test_client(app: FastAPI, **options: str) -> Any:
    """Starlette's in-process ASGI client (it warns that it wants httpx2 instead of httpx; either works)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
        from starlette.testclient import TestClient

    return TestClient(app, **options)


def _in_process_app(tmp_path: Path) -> FastAPI:
    """The production app plus a WebSocket route, run in-process (uvicorn has no WebSocket library here)."""
    app = create_app(settings_for(tmp_path, auth_enabled=True, bootstrap_api_key=BOOTSTRAP))

    async def echo_key(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(str(websocket.state.api_key_id))
        await websocket.close()

    app.add_api_websocket_route("/_test/ws", echo_key)
    return app


def test_websocket_routes_need_a_key_too(tmp_path: Path) -> None:
    with _test_client(_in_process_app(tmp_path)) as client:
        with pytest.raises(WebSocketDisconnect) as refused, client.websocket_connect("/_test/ws"):
            pass
        assert refused.value.code == 1008
        with client.websocket_connect("/_test/ws", headers={"X-API-Key": BOOTSTRAP}) as websocket:
            assert websocket.receive_text() == BOOTSTRAP_KEY_ID


def test_health_stays_open_behind_a_proxy_prefix(tmp_path: Path) -> None:
    with _test_client(_in_process_app(tmp_path), root_path="/engine") as client:
        assert client.get("/engine/healthz").status_code == 200
        assert client.get("/engine/v1/models").status_code == 401
        assert client.get("/engine/v1/models", headers={"X-API-Key": BOOTSTRAP}).status_code == 200
