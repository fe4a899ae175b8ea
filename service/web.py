"""The web page at `/` to try the models, and `/docs` (Swagger UI) served from local files, so both work offline.

FastAPI's own `/docs` and `/redoc` pages load their scripts from a CDN and stay blank without internet. Swagger
UI's dist files come from the `fastapi-offline` package (MIT; Swagger UI itself is Apache-2.0) instead.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).parent / "web"
SWAGGER_DIR = Path(str(files("fastapi_offline") / "static"))
UI_PREFIX = "/ui/"
# What a browser needs before it can ask for a key: the page, its files, and the API's description.
PUBLIC_PATHS = frozenset({"/", "/docs", "/openapi.json"})


def is_public(path: str) -> bool:
    """Routes served without an API key even when one is configured (they hold no model or data)."""
    return path in PUBLIC_PATHS or path.startswith(UI_PREFIX)


def mount(app: FastAPI, title: str) -> None:
    """Register `/` (the page), its files under `/ui/`, and an offline `/docs` in place of FastAPI's CDN one.

    `title` names the API in its OpenAPI document and the docs page.
    """
    app.title = title
    cdn_pages = {app.docs_url, app.redoc_url} - {None}
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in cdn_pages]
    app.docs_url = app.redoc_url = None
    app.mount(f"{UI_PREFIX}swagger", StaticFiles(directory=SWAGGER_DIR), name="swagger-ui")
    app.mount(UI_PREFIX.rstrip("/"), StaticFiles(directory=PAGE_DIR), name="web-ui")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{title} - API docs",
            swagger_js_url=f"{UI_PREFIX}swagger/swagger-ui-bundle.js",
            swagger_css_url=f"{UI_PREFIX}swagger/swagger-ui.css",
            swagger_favicon_url=f"{UI_PREFIX}swagger/favicon.png",
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
        )
