"""The FastAPI app: `create_app(settings)` and the factory both front-ends build their app with.

    python -m app                          # serve on :8000 with settings from RLRR_* env vars
    curl -H 'Content-Type: image/jpeg' --data-binary @cat.jpg 'localhost:8000/classify?task=pets'

The lifespan starts the app's service (app.service: backbone -> adapters in the store -> warm-up ->
ready) and closes it; the service lives on `app.state.service`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.docs import install_docs
from app.errors import error_responses, install_handlers, unexpected
from app.routes import classify, health, page, tasks, v2
from app.service import Front, Service
from app.settings import Settings

# The routes both fronts mount, the single server and the Ray ingress (app.ray_serve): one list, so a
# route added here reaches both. They call the `Front` protocol only.
ROUTERS = (classify.router, tasks.router, health.router, v2.router, page.router)
# Uploads and deletes write the server's own store: the single server only (Ray replicas read a shared one).
ADMIN_ROUTERS = (tasks.admin,)


def create_app(settings: Settings | None = None, metrics_registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the service; nothing heavy happens until the lifespan starts.

    Args:
        settings: Service settings; read from RLRR_* env vars when None.
        metrics_registry: Prometheus registry for the app's metrics; a fresh one when None.
    """
    return build_api(Service(settings or Settings(), metrics_registry), (*ROUTERS, *ADMIN_ROUTERS))


def build_api(service: Front, routers: Iterable[APIRouter], title: str = "rlrr-serve",
              summary: str = "One frozen ViT, many RLRR task adapters.") -> FastAPI:
    """A FastAPI app over a service: its routes, error table, docs and request metrics.

    Args:
        service: What the routes call; started and closed by the app's lifespan.
        routers: The routes to mount.
        title: The API's title (OpenAPI, /v2).
        summary: Its one-line summary.
    """
    app = FastAPI(
        title=title,
        summary=summary,
        version="0.1.0",
        lifespan=_lifespan,
        responses=error_responses(500),
        redirect_slashes=False,  # a redirect would echo the client's Host header back
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings, app.state.service = service.settings, service
    install_handlers(app)
    install_docs(app)
    app.middleware("http")(_record_request)
    app.add_middleware(HeadAsGet)
    app.add_middleware(BrowserHeaders)
    for router in routers:
        app.include_router(router)
    return app


# The page loads only its own files; /docs and /redoc start Swagger UI / ReDoc with an inline script.
# Neither may be framed (an admin pastes the token into /docs), and no answer is MIME-sniffed.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
             "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
             "form-action 'self'; frame-ancestors 'none'")
DOCS_PAGES = ("/docs", "/redoc")


class BrowserHeaders:
    """Browser security headers on every answer: nosniff, no referrer, a CSP that forbids framing.

    Args:
        app: The wrapped ASGI app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = _DOCS_CSP if scope["path"] in DOCS_PAGES else _CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "DENY")  # frame-ancestors for browsers without CSP 2
                headers.setdefault("Content-Security-Policy", policy)
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeadAsGet:
    """HEAD answered wherever GET is: the GET route runs, its headers (Content-Length too) are sent,
    its body is not. FastAPI routes declare GET only, and Starlette would answer HEAD with 405.

    Args:
        app: The wrapped ASGI app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        # A copy: the server keeps its own scope as HEAD (uvicorn then sends no body either).
        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    service: Front = app.state.service
    await service.start()
    try:
        yield
    finally:
        await service.close()


async def _record_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception as exc:  # a bug: answer it here, so it is counted and the connection survives
        response = unexpected(request, exc)
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")  # the template, not the raw path: bounded label values
    metrics = request.app.state.service.metrics
    metrics.count_request(path, getattr(request.state, "task", ""), str(response.status_code))
    metrics.latency.labels(path).observe(time.perf_counter() - start)
    return response
