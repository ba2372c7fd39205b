"""The OpenAPI document, Swagger UI and ReDoc, served by the service itself (SPEC §3).

The UI assets come from the `fastapi-offline` distribution (Swagger UI 5, ReDoc 2,
pinned in uv.lock), so `/docs` and `/redoc` work on a machine without internet
access: no page names another host, the favicon included. Every route here is an
`APIRoute` (outside the schema), so each is counted under its own path in the metrics.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from starlette.responses import Response

from api.errors import NotFound
from api.helpers.orjson_coder import dumps

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = f"{DOCS_URL}/oauth2-redirect"
ASSETS_URL = f"{DOCS_URL}/assets"

# The files a docs page may load, with their media types; nothing else is served.
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
ASSET_CACHE_CONTROL = "public, max-age=86400"

SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    "persistAuthorization": True,
    # Swagger UI would otherwise ask validator.swagger.io for a badge image.
    "validatorUrl": None,
}


@cache
def _asset(name: str) -> bytes:
    return (files("fastapi_offline") / "static" / name).read_bytes()


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def install(app: FastAPI) -> None:
    """Add the OpenAPI document, both UIs and their assets to `app`."""

    @cache
    def openapi_bytes() -> bytes:
        return dumps(app.openapi())  # serialised once per app

    async def openapi_document() -> Response:
        return Response(openapi_bytes(), media_type="application/json")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    async def asset(name: str) -> Response:
        media_type = ASSET_TYPES.get(name)
        if media_type is None:
            raise NotFound(f"No documentation asset named {name!r}.")
        return Response(
            _asset(name),
            media_type=media_type,
            headers={"Cache-Control": ASSET_CACHE_CONTROL},
        )

    for path, endpoint in (
        (OPENAPI_URL, openapi_document),
        (DOCS_URL, swagger_ui),
        (OAUTH2_REDIRECT_URL, swagger_ui_oauth2_redirect),
        (REDOC_URL, redoc),
        (ASSETS_URL + "/{name}", asset),
    ):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
