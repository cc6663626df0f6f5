"""/docs (Swagger UI) and /redoc served from files installed with the package, so they work offline.

FastAPI's defaults load both from a CDN; `fastapi-offline` ships the same bundles, which are served here.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(fastapi_offline.__file__).parent / "static"
PREFIX = "/docs-static"


def install_docs(app: FastAPI) -> None:
    """Mount the bundled assets and the two documentation pages (URLs relative: fine behind a proxy prefix).

    Args:
        app: The application.
    """
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="docs-static")
    assets = PREFIX.lstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/redoc.standalone.js", redoc_favicon_url=f"{assets}/favicon.png",
                              with_google_fonts=False)
