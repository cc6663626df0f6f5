"""The service: one frozen backbone serving many tasks, with no HTTP in it.

    service = Service(settings)
    await service.start()                  # backbone -> adapters in the store -> warm-up -> ready
    answer = await service.classify("pets", [jpeg_bytes], top_k=5)
    await service.close()

A `Service` is the `Engine` (backbone), the `Registry` (tasks and their store), the `Batcher`, the
`Preprocessor` and the `Metrics`. Both front-ends hold one: the FastAPI app (app.main) and each Ray
Serve classifier replica (app.ray_serve, `on_demand`). The routes they share call it through `Front`.
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
from app.errors import InvalidAdapter, NotReady, UnknownTask
from app.metrics import Metrics
from app.peft_upload import is_peft_upload, peft_to_adapter
from app.preprocess import Preprocessor, scale_size
from app.registry import Registry, check_name
from app.schemas import ClassifyResponse, TaskDetail, TaskInfo, TaskList, backbone_info, classify_response, task_detail
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

    async def catalog(self) -> TaskList: ...

    async def detail(self, name: str) -> TaskDetail: ...


class Service:
    """One backbone and the tasks it serves; `start` builds it, `close` frees it.

    Args:
        settings: The service settings.
        metrics_registry: Prometheus registry of its metrics; a fresh one when None.
        on_demand: Load no task at start, each one when first asked for (`load_task`), and list the
            store as it is now (a Ray replica: it holds the tasks Serve sends it, beside others).
    """

    engine: Engine
    registry: Registry
    batcher: Batcher[BatchItem, TopK]
    preprocessor: Preprocessor

    def __init__(self, settings: Settings, metrics_registry: CollectorRegistry | None = None, *,
                 on_demand: bool = False) -> None:
        self.settings = settings
        self.metrics = Metrics(metrics_registry)
        self.on_demand = on_demand
        self.ready = False
        self._warm = not (settings.warmup and on_demand)  # warmed up at start, unless it starts with no task
        self._details: dict[str, tuple[tuple[int, ...] | None, TaskDetail]] = {}  # on demand: name -> (files, detail)

    async def start(self) -> None:
        """Build the backbone, load the store's adapters (unless on demand), warm up; then ready."""
        settings, metrics = self.settings, self.metrics
        self.engine = await asyncio.to_thread(Engine.from_settings, settings, metrics)
        _announce(self.engine, metrics)
        self.registry = Registry(settings.store, self.engine)
        if not self.on_demand:
            await self.registry.load_store()
            log.info("serving %d task(s) from %s; %d skipped", len(self.registry.tasks), settings.store,
                     len(self.registry.skipped))
        if settings.warmup:
            await self.engine.warm_up(list(self.registry.tasks.values()))
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
        await self.batcher.close()
        self.preprocessor.close()
        self.engine.close()

    async def readiness(self) -> int:
        """The number of tasks it can serve; `NotReady` while starting or stopping."""
        if not self.ready:
            raise NotReady("not ready")
        return len(self.registry.stored_names()) if self.on_demand else len(self.registry.tasks)

    def admit(self, task: str) -> None:
        """Refuse a request before its body is read: unknown task, or no room in the queue.

        Args:
            task: Task name.
        """
        self.registry.get(task)
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
        loaded = await self.load_task(task) if self.on_demand else self.registry.get(task)
        return await self.answer(loaded, images, top_k, since)

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
        futures = self.batcher.submit_many([BatchItem(task, t, k) for t in tensors])
        predictions = list(await asyncio.gather(*futures))
        self.metrics.images.labels(task.name).inc(len(predictions))  # counted once the whole request is answered
        return predictions

    async def catalog(self) -> TaskList:
        """The backbone and every task: servable (`loaded`) or refused with its reason (`skipped`)."""
        registry = self.registry
        names = registry.stored_names() if self.on_demand else [*registry.tasks, *registry.skipped]
        details = [await self.detail(name) for name in names]
        ordered = sorted(details, key=lambda d: (d.state != "loaded", d.name))
        tasks = [TaskInfo(**d.model_dump(include=set(TaskInfo.model_fields))) for d in ordered]
        return TaskList(backbone=backbone_info(self.engine, self.settings), tasks=tasks)

    async def detail(self, name: str) -> TaskDetail:
        """One task: labels, configuration, training metrics; or why it was refused.

        Args:
            name: Task name.
        """
        if self.on_demand:
            return await self._stored_detail(name)
        if name in self.registry.skipped:
            return TaskDetail(name=name, state="skipped", reason=self.registry.skipped[name])
        return task_detail(self.registry.get(name))

    async def add_task(self, name: str, config: bytes, weights: bytes, labels: list[str] | None = None) -> TaskDetail:
        """Validate an adapter, write it into the store atomically and serve it (nothing changes if it fails).

        Args:
            name: Task name (already validated).
            config: Contents of the adapter's config file (this server's, or PEFT's).
            weights: Contents of its weights file.
            labels: Class names of a PEFT adapter (PEFT stores none).
        """
        if is_peft_upload(config):  # converted for this backbone, then the same validation and install
            config, weights = await asyncio.to_thread(peft_to_adapter, self.engine, config, weights, labels)
        return task_detail(await self.registry.install(name, config, weights))

    async def remove_task(self, name: str) -> None:
        """Stop serving a task and remove it from the store.

        Args:
            name: Task name (already validated).
        """
        await self.registry.delete(name)

    async def load_task(self, name: str) -> LoadedTask:
        """Load a task from the store (again) and serve it; the first one loaded on demand warms up.

        Args:
            name: Task name.
        """
        task = await self.registry.load(name)
        if not self._warm:
            self._warm = True
            await self.engine.warm_up([task])
        return task

    async def unload_task(self, name: str, key: str | None = None) -> None:
        """Stop serving a task, leaving it in the store.

        Args:
            name: Task name.
            key: Only this version (a newer one loaded meanwhile stays); None: any version.
        """
        await self.registry.unload(name, key)

    async def _stored_detail(self, name: str) -> TaskDetail:
        stored = self.registry.stored_names()
        if name not in stored:
            raise UnknownTask(f"unknown task {name!r}", tasks=stored)
        # Validating an adapter reads its weights: remember the answer until its files change.
        signature = self.registry.signature(name)
        cached = self._details.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            check_name(name)
            detail = task_detail(await self.registry.inspect(name))
        except (InvalidAdapter, UnknownTask) as exc:
            detail = TaskDetail(name=name, state="skipped", reason=exc.detail)
        self._details[name] = (signature, detail)
        return detail

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
