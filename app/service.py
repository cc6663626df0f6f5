"""The service: one frozen backbone serving many tasks, with no HTTP in it.

    service = Service(settings)
    await service.start()                  # backbone -> adapters in the store -> warm-up -> ready
    answer = await service.classify("pets", [jpeg_bytes], top_k=5)
    await service.close()

A `Service` is the `Engine` (backbone), the `Registry` (tasks, their store and tiers), the `Batcher`,
the `Preprocessor` and the `Metrics`. Both front-ends hold one: the FastAPI app (app.main) and each
Ray Serve classifier replica (app.ray_serve, `watch_store`). The routes they share call it through `Front`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry

from app.batcher import Batcher
from app.engine import Engine
from app.errors import NotReady
from app.metrics import Metrics
from app.peft_upload import is_peft_upload, peft_to_adapter
from app.preprocess import Preprocessor, scale_size
from app.registry import Entry, Registry
from app.schemas import (
    ClassifyResponse,
    TaskDetail,
    TaskList,
    backbone_info,
    classify_response,
    entry_detail,
    entry_info,
)
from app.settings import Settings
from app.tasks import BatchItem, LoadedTask, TopK

log = logging.getLogger("app")


class Front(Protocol):
    """What the routes both front-ends mount call: a `Service`, or a Ray ingress's proxy of its replicas."""

    settings: Settings
    metrics: Metrics

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def readiness(self) -> int: ...

    def admit(self, task: str) -> None: ...

    async def classify(self, task: str, images: Sequence[bytes], top_k: int,
                       since: float | None = None) -> ClassifyResponse: ...

    async def catalog(self, limit: int = 100, cursor: str | None = None, name: str | None = None) -> TaskList: ...

    async def detail(self, name: str) -> TaskDetail: ...


class Service:
    """One backbone and the tasks it serves; `start` builds it, `close` frees it.

    Args:
        settings: The service settings.
        metrics_registry: Prometheus registry of its metrics; a fresh one when None.
        watch_store: Compare a task's files with the known ones on each request and reread them if they
            changed (a Ray replica: other processes write the store, and admin uploads are not routed to it).
    """

    engine: Engine
    registry: Registry
    batcher: Batcher[BatchItem, TopK]
    preprocessor: Preprocessor

    def __init__(self, settings: Settings, metrics_registry: CollectorRegistry | None = None, *,
                 watch_store: bool = False) -> None:
        self.settings = settings
        self.metrics = Metrics(metrics_registry, per_task=settings.task_metrics)
        self.watch_store = watch_store
        self.ready = False
        self._warm = not settings.warmup  # warmed up at start, or on the first load if no task could be

    async def start(self) -> None:
        """Build the backbone, read the store's configs and load the pinned tasks, warm up; then ready."""
        settings, metrics = self.settings, self.metrics
        self.engine = await asyncio.to_thread(Engine.from_settings, settings, metrics)
        _announce(self.engine, metrics)
        self.registry = registry = Registry(settings.store, self.engine, settings.resident_bytes,
                                            settings.pinned_tasks, settings.startup_configs)
        await registry.load_store()
        log.info("%d task(s) in %s (%d pinned, %d skipped so far); resident budget %.0f MiB", len(registry.names()),
                 settings.store, sum(e.pinned for e in registry.entries.values()), len(registry.skipped),
                 settings.resident_bytes / 2**20)
        if settings.warmup:
            first = await registry.warm_task()
            await self.engine.warm_up([first] if first is not None else [])
            self._warm = first is not None
        self.batcher = Batcher(self.engine.run, max_batch_size=settings.max_batch_size,
                               max_wait_s=settings.max_wait_ms / 1000, max_queue=settings.queue_size,
                               on_batch=self._observe_batch, on_depth=metrics.queue_depth.set)
        self.batcher.start()
        self.preprocessor = Preprocessor(settings.preprocess_workers, settings.max_pixels, settings.max_request_pixels)
        self.ready = True
        log.info("ready")

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, free the backbone."""
        self.ready = False
        await self.registry.close()
        await self.batcher.close()
        self.preprocessor.close()
        self.engine.close()

    async def readiness(self) -> int:
        """The number of tasks it can serve (in any tier); `NotReady` while starting or stopping."""
        if not self.ready:
            raise NotReady("not ready")
        return len(self.registry.names()) - len(self.registry.skipped)

    def admit(self, task: str) -> None:
        """Refuse a request before its body is read (unknown task, no room in the queue); start loading a
        stored task meanwhile.

        Args:
            task: Task name.
        """
        self.registry.check(task)
        self.batcher.check_room(1)

    async def classify(self, task: str, images: Sequence[bytes], top_k: int,
                       since: float | None = None) -> ClassifyResponse:
        """The top-k classes of each image under a task.

        Args:
            task: Task name.
            images: Encoded images (already counted and size-checked by the caller).
            top_k: Classes per image.
            since: `time.perf_counter()` when the request arrived; now when None.
        """
        return await self.answer(await self.load_task(task), images, top_k, since)

    async def answer(self, task: LoadedTask, images: Sequence[bytes], top_k: int,
                     since: float | None = None) -> ClassifyResponse:
        """`classify` with a task version already in hand.

        Args:
            task: The task version to run.
            images: Encoded images.
            top_k: Classes per image.
            since: `time.perf_counter()` when the request arrived; now when None.
        """
        since = time.perf_counter() if since is None else since
        predictions = await self.predict(task, images, top_k)
        return classify_response(task, self.engine.fingerprint, time.perf_counter() - since, predictions)

    async def predict(self, task: LoadedTask, images: Sequence[bytes], k: int) -> list[TopK]:
        """The best `k` (class index, probability) pairs of each image, in request order.

        The one path every classification takes (/classify, the Open Inference Protocol's infer, Ray),
        so limits, batching, errors and metrics are the same whatever the wire format.

        Args:
            task: The task version to run.
            images: Encoded images (already counted and size-checked by the caller).
            k: Classes per image.
        """
        self.batcher.check_room(len(images))  # a full queue answers 503 before any decoding work
        tensors = await self.preprocessor.decode_many(images, task.transform, scale_size(task.data_config))
        self.registry.hold(task, +1)  # not evicted while its rows are queued
        try:
            futures = self.batcher.submit_many([BatchItem(task, t, k) for t in tensors])
            predictions = list(await asyncio.gather(*futures))
        finally:
            self.registry.hold(task, -1)
        self.metrics.count_images(task.name, len(predictions))  # counted once the whole request is answered
        return predictions

    async def catalog(self, limit: int = 100, cursor: str | None = None, name: str | None = None) -> TaskList:
        """One page of the store's tasks in name order: servable (`loaded`, with their tier) or refused.

        The page's work plus one scan of the names, on the event loop; no task's tensors are read.

        Args:
            limit: Most tasks in the page.
            cursor: The previous page's `next_cursor` (tasks after that name).
            name: Only tasks whose name contains this (case-insensitive).
        """
        entries, total = self.registry.page(cursor, limit + 1, name)
        more = len(entries) > limit
        entries = entries[:limit]
        tasks = [entry_info(e, self._folded(e)) for e in entries]
        return TaskList(backbone=backbone_info(self.engine, self.settings), tasks=tasks, total=total,
                        next_cursor=entries[-1].name if more else None)

    async def detail(self, name: str) -> TaskDetail:
        """One task: labels, configuration, training metrics, tier; or why it was refused.

        Args:
            name: Task name.
        """
        entry = await self.registry.describe(name, refresh=self.watch_store)
        return entry_detail(entry, self._folded(entry))

    async def add_task(self, name: str, config: bytes, weights: bytes, labels: list[str] | None = None,
                       pinned: bool = False) -> TaskDetail:
        """Validate an adapter, write it into the store atomically and serve it (nothing changes if it fails).

        Args:
            name: Task name (already validated).
            config: Contents of the adapter's config file (this server's, or PEFT's).
            weights: Contents of its weights file.
            labels: Class names of a PEFT adapter (PEFT stores none).
            pinned: Never evict it (until restart, or an upload without the flag).
        """
        if is_peft_upload(config):  # converted for this backbone, then the same validation and install
            config, weights = await asyncio.to_thread(peft_to_adapter, self.engine, config, weights, labels)
        await self.registry.install(name, config, weights, pinned)
        return await self.detail(name)

    async def remove_task(self, name: str) -> None:
        """Stop serving a task and remove it from the store.

        Args:
            name: Task name (already validated).
        """
        await self.registry.delete(name)

    async def load_task(self, name: str) -> LoadedTask:
        """A task's resident version, loaded from the store if it is only stored; the first one loaded warms
        up a server that started without any.

        Args:
            name: Task name.
        """
        task = await self.registry.resident(name, refresh=self.watch_store)
        if not self._warm:
            self._warm = True
            await self.engine.warm_up([task])
        return task

    async def unload_task(self, name: str, key: str | None = None) -> None:
        """Make a task stored again (out of memory), leaving it in the store.

        Args:
            name: Task name.
            key: Only this version (a newer one loaded meanwhile stays); None: any version.
        """
        await self.registry.unload(name, key)

    def _folded(self, entry: Entry) -> bool:
        return entry.resident is not None and entry.resident.key in self.engine.cache

    def _observe_batch(self, size: int, waits: list[float]) -> None:
        self.metrics.batch_size.observe(size)
        for wait in waits:
            self.metrics.queue_wait.observe(wait)


def _announce(engine: Engine, metrics: Metrics) -> None:
    log.info("backbone %s on %s (%s), fingerprint %s…", engine.name, engine.device,
             str(engine.dtype).removeprefix("torch."), engine.fingerprint[:12])
    if engine.random_weights:
        log.warning("backbone %s has RANDOM weights (no RLRR_CHECKPOINT, RLRR_PRETRAINED unset): "
                    "predictions are meaningless demo output", engine.name)
    metrics.backbone.info({"name": engine.name, "fingerprint": engine.fingerprint,
                           "random_weights": str(engine.random_weights).lower(),
                           "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch.")})
