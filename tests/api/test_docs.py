"""/docs and /redoc work on a host without internet access: every asset they load comes from the server."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

# src="...", href="...", url: '...' (Swagger UI's spec URL), redoc's spec-url="..."
_REFERENCE = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl:\s*["']([^"']+)["']""")
_CSS_URL = re.compile(r"""url\(\s*["']?([^"')]+)["']?\s*\)""")


def _references(text: str) -> list[str]:
    return [a or b for a, b in _REFERENCE.findall(text)]


@pytest.mark.parametrize(
    ("page", "expected_assets"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
        ("/redoc", {"redoc.standalone.js", "favicon.png"}),
    ],
)
def test_docs_page_and_every_asset_it_references_come_from_this_server(
    api: httpx.Client, page: str, expected_assets: set[str]
) -> None:
    response = api.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    base = str(api.base_url)
    references = _references(response.text)
    assert references, response.text
    fetched: set[str] = set()
    for reference in references:
        url = urljoin(base + page, reference)
        assert urlsplit(url).netloc == urlsplit(base).netloc, f"{page} loads {reference} from another host"
        asset = api.get(url)
        assert asset.status_code == 200, f"{reference}: {asset.status_code}"
        assert asset.content, reference
        fetched.add(urlsplit(url).path.rsplit("/", 1)[-1])
        if reference.endswith(".css"):
            for css_url in _CSS_URL.findall(asset.text):
                assert css_url.startswith("data:") or not urlsplit(css_url).netloc, css_url
    assert expected_assets <= fetched
    assert "openapi.json" in fetched


def test_docs_pages_load_no_fonts_or_validator_from_the_internet(api: httpx.Client) -> None:
    assert "fonts.googleapis.com" not in api.get("/redoc").text
    swagger = api.get("/docs").text
    assert "cdn.jsdelivr.net" not in swagger
    assert '"validatorUrl": null' in swagger


def test_swagger_oauth2_redirect_page_is_served(api: httpx.Client) -> None:
    response = api.get("/docs/oauth2-redirect")
    assert response.status_code == 200
    assert "oauth2" in response.text.lower()
