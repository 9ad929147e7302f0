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

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs-assets"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"


def docs_assets_dir() -> Path:
    """The folder holding Swagger UI's and ReDoc's scripts, Swagger UI's CSS and the favicon."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """Add the offline Swagger UI and ReDoc pages and their assets to ``app``."""
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
