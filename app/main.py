"""The FastAPI app: `create_app(settings)` and its lifespan.

    python -m app                          # serve on :8000 with settings from RLRR_* env vars
    curl -H 'Content-Type: image/jpeg' --data-binary @cat.jpg 'localhost:8000/classify?task=pets'

Start-up order: backbone -> adapters in the store -> warm-up -> ready. State lives on `app.state`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry

from app.batcher import Batcher
from app.docs import install_docs
from app.engine import BatchItem, Engine, TopK
from app.errors import error_responses, install_handlers, unexpected
from app.metrics import Metrics
from app.preprocess import Preprocessor
from app.registry import Registry
from app.routes import classify, health, page, tasks, v2
from app.settings import Settings

log = logging.getLogger("app")


def create_app(settings: Settings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the service; nothing heavy happens until the lifespan starts.

    Args:
        settings: Service settings; read from RLRR_* env vars when None.
        registry: Prometheus registry for the app's metrics; a fresh one when None.
    """
    settings = settings or Settings()
    metrics = Metrics(registry)
    app = FastAPI(
        title="rlrr-serve",
        summary="One frozen ViT, many RLRR task adapters.",
        version="0.1.0",
        lifespan=_lifespan,
        responses=error_responses(500),
        redirect_slashes=False,  # a redirect would echo the client's Host header back
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings, app.state.metrics, app.state.ready = settings, metrics, False
    install_handlers(app)
    install_docs(app)
    app.middleware("http")(_record_request)
    for module in (classify, tasks, health, v2, page):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    engine = await asyncio.to_thread(Engine.from_settings, settings, metrics)
    _announce(engine, metrics)
    registry = Registry(settings.store, engine)
    await registry.load_store()
    log.info("serving %d task(s) from %s; %d skipped", len(registry.tasks), settings.store, len(registry.skipped))
    if settings.warmup:
        await engine.warm_up(list(registry.tasks.values()))
    batcher: Batcher[BatchItem, TopK] = Batcher(
        engine.run,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue=settings.queue_size,
        on_batch=lambda size, waits: _observe_batch(metrics, size, waits),
        on_depth=metrics.queue_depth.set,
    )
    batcher.start()
    preprocessor = Preprocessor(settings.preprocess_workers, settings.max_pixels, settings.max_request_pixels)
    app.state.engine, app.state.registry = engine, registry
    app.state.batcher, app.state.preprocessor = batcher, preprocessor
    app.state.ready = True
    log.info("ready")
    try:
        yield
    finally:
        app.state.ready = False
        await batcher.close()
        preprocessor.close()
        engine.close()


def _announce(engine: Engine, metrics: Metrics) -> None:
    log.info("backbone %s on %s (%s), fingerprint %s…", engine.name, engine.device,
             str(engine.dtype).removeprefix("torch."), engine.fingerprint[:12])
    if engine.random_weights:
        log.warning("backbone %s has RANDOM weights (no RLRR_CHECKPOINT, RLRR_PRETRAINED unset): "
                    "predictions are meaningless demo output", engine.name)
    metrics.backbone.info({"name": engine.name, "fingerprint": engine.fingerprint,
                           "random_weights": str(engine.random_weights).lower(),
                           "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch.")})


def _observe_batch(metrics: Metrics, size: int, waits: list[float]) -> None:
    metrics.batch_size.observe(size)
    for wait in waits:
        metrics.queue_wait.observe(wait)


async def _record_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    start = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception as exc:  # a bug: answer it here, so it is counted and the connection survives
        response = unexpected(request, exc)
    route = request.scope.get("route")
    path = getattr(route, "path", "unmatched")  # the template, not the raw path: bounded label values
    metrics: Metrics = request.app.state.metrics
    metrics.requests.labels(path, getattr(request.state, "task", ""), str(response.status_code)).inc()
    metrics.latency.labels(path).observe(time.perf_counter() - start)
    return response
