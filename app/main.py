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

from app.docs import install_docs
from app.errors import error_responses, install_handlers, unexpected
from app.routes import classify, health, page, tasks, v2
from app.service import Front, Service
from app.settings import Settings

ROUTERS = (classify.router, tasks.router, tasks.admin, health.router, v2.router, page.router)


def create_app(settings: Settings | None = None, metrics_registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the service; nothing heavy happens until the lifespan starts.

    Args:
        settings: Service settings; read from RLRR_* env vars when None.
        metrics_registry: Prometheus registry for the app's metrics; a fresh one when None.
    """
    return build_api(Service(settings or Settings(), metrics_registry), ROUTERS)


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
    for router in routers:
        app.include_router(router)
    return app


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
