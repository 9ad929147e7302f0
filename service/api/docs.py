"""Interactive API documentation (Swagger UI at ``/docs``, ReDoc at ``/redoc``) served offline.

FastAPI's default pages load their JavaScript, CSS, favicon and web fonts from public CDNs, so on a host
without internet access they render blank. Here the pages reference only this server: the assets come
from the ``fastapi-offline`` package (MIT; it ships Swagger UI's and ReDoc's distribution builds), served
under :data:`ASSETS_PATH`. ReDoc is rendered without Google Fonts for the same reason.

Contract: :func:`install_docs` expects an app created with ``docs_url=None`` and ``redoc_url=None``; it
adds ``/docs``, ``/docs/oauth2-redirect``, ``/redoc`` and the static assets. The pages are protected
exactly like ``/openapi.json`` (see :mod:`service.api.auth`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from service.datasets.preprocess import PreprocessSpec
from service.datasets.preprocess_examples import openapi_examples

ASSETS_PATH = "/docs-assets"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"


def docs_assets_dir() -> Path:
    """The folder holding Swagger UI's and ReDoc's scripts, Swagger UI's CSS and the favicon."""
    return Path(str(files("fastapi_offline") / "static"))


# Models that requests carry inside form fields (so FastAPI cannot see them) but the schema must name.
_FORM_FIELD_SCHEMAS: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "PreprocessSpec": (PreprocessSpec, openapi_examples()),
}


def publish_form_field_schemas(app: FastAPI) -> None:
    """Add the JSON schemas of form-field models (``PreprocessSpec``) to ``components.schemas``.

    Each gets its worked examples (OpenAPI 3.1 ``examples`` keyword: a list of values) so Swagger UI and
    ReDoc show them beside the fields.
    """
    generate = app.openapi

    def openapi_with_form_schemas() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI; the additions are idempotent
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, (model, examples) in _FORM_FIELD_SCHEMAS.items():
            published = model.model_json_schema(ref_template="#/components/schemas/{model}")
            published["examples"] = [example["value"] for example in examples.values()]
            components[name] = published
        return schema

    app.openapi = openapi_with_form_schemas  # type: ignore[method-assign]


def install_docs(app: FastAPI) -> None:
    """Add the offline Swagger UI and ReDoc pages and their assets to ``app``."""
    publish_form_field_schemas(app)
    app.mount(ASSETS_PATH, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def read_swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_PATH}",
            swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            # Swagger UI's default validator badge is an image from validator.swagger.io: off.
            swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
        )

    @app.get(OAUTH2_REDIRECT_PATH, include_in_schema=False)
    async def read_swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_PATH, include_in_schema=False)
    async def read_redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
            with_google_fonts=False,
        )
