"""Interactive API docs at /docs that work offline: Swagger UI's files are served from the `swagger-ui-py`
package (pinned in pyproject.toml), not fetched from a CDN."""

from __future__ import annotations

from pathlib import Path

import swagger_ui
from fastapi import FastAPI
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from services.control.errors import ApiError

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"
SWAGGER_DIR = Path(swagger_ui.__file__).resolve().parent / "static"
# The only files the page loads; nothing else of the package is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def install(app: FastAPI) -> None:
    """Serve /docs (Swagger UI for the app's OpenAPI document) and its assets; create the app with
    `docs_url=None, redoc_url=None` so that FastAPI's CDN-based pages are not served."""

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_page() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge from validator.swagger.io
        )

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def swagger_asset(name: str = PathParam(max_length=64)) -> FileResponse:
        if name not in ASSETS:
            raise ApiError(404, f"no docs asset {name!r}")
        return FileResponse(SWAGGER_DIR / name, media_type=ASSETS[name])
