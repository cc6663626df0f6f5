"""The same HTTP API on Ray Serve: many replicas, each with one backbone; tasks are multiplexed models.

    serve run app.ray_serve:app                                  # settings from RLRR_* env vars
    serve run app.ray_serve:build_app ray_replicas=4 ray_gpus=0.5
    serve deploy deploy/serve.yaml                               # on a running Ray cluster

Two deployments. `Ingress` (FastAPI, no model, no GPU) parses the request exactly as the single server
does and calls `Classifier` with the task name as the multiplexed model id, so Serve routes a task's
requests to replicas that already hold it. Each `Classifier` replica is the single server's core: one
`Engine` (backbone), a `Registry` over the shared store, a `Batcher` and a `Preprocessor`; it loads a
task on its first request and drops the least recently used one past `ray_tasks_per_replica`.

Every classify answer names its replica (`x-rlrr-replica` header); `GET /replicas` counts requests per
replica and task as seen by this ingress replica. Admin uploads are not routed here: write adapters
into the store (`python -m trainer ...`); replicas pick up new and changed adapters on the next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from app.batcher import Batcher
from app.engine import BatchItem, Engine, TopK
from app.errors import AppError, InvalidAdapter, NotReady, UnknownTask, install_handlers
from app.main import _observe_batch, _record_request
from app.metrics import Metrics
from app.payloads import read_images
from app.preprocess import Preprocessor, scale_size
from app.registry import CONFIG_NAME, NAME_MAX, NAME_PATTERN, WEIGHTS_NAME, Registry, valid_name
from app.schemas import (
    ClassifyResponse,
    Health,
    TaskDetail,
    TaskInfo,
    TaskList,
    backbone_info,
    classify_response,
    task_detail,
)
from app.settings import Settings
from app.tasks import LoadedTask

READY_TIMEOUT_S = 5.0  # /readyz answers 503 rather than hang while no classifier replica is up
REPLICA_HEADER = "x-rlrr-replica"
_background: set[asyncio.Task[None]] = set()  # strong references: the loop only keeps weak ones


@dataclass
class Reply:
    """A classifier replica's answer to one /classify call.

    Attributes:
        answer: The `ClassifyResponse` fields.
        replica: Serve's unique id of the replica that ran it.
        held: Tasks loaded on that replica after the call.
    """

    answer: dict[str, Any]
    replica: str
    held: list[str] = field(default_factory=list)


def _signature(directory: os.PathLike[str] | str) -> tuple[int, ...] | None:
    # Adapters are written by renaming files/folders into place, so a new version has a new inode.
    try:
        stats = [os.stat(os.path.join(directory, name)) for name in (CONFIG_NAME, WEIGHTS_NAME)]
    except OSError:
        return None
    return tuple(x for st in stats for x in (st.st_ino, st.st_mtime_ns, st.st_size))


class _Slot:
    """What Serve's multiplexer caches for a task: the loaded version, reloaded when the store's copy changes.

    Args:
        registry: The replica's registry.
        name: Task name.
    """

    def __init__(self, registry: Registry, name: str) -> None:
        self.registry, self.name = registry, name
        self.task: LoadedTask | None = None
        self.signature: tuple[int, ...] | None = None
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._unloaded = False

    async def current(self) -> LoadedTask:
        """The task's current version, (re)loading it if the store holds a different one."""
        async with self._lock:
            signature = _signature(self.registry.store / self.name)  # taken before loading: a change during
            if signature is None:                                    # the load is seen on the next request
                await self.registry.unload(self.name, self.task.key if self.task else None)
                raise UnknownTask(f"unknown task {self.name!r}", tasks=self.registry.stored_names())
            if self.task is None or signature != self.signature:
                try:
                    self.task = await self.registry.load(self.name)
                except InvalidAdapter as exc:  # the single server skips such adapters: 404 there too
                    raise UnknownTask(f"task {self.name!r} is not served: {exc.detail}") from exc
                self.signature = signature
            return self.task

    def __del__(self) -> None:
        # Serve calls this (on a worker thread) when it evicts the task; GC may call it again later.
        if self._unloaded or self.task is None:
            return
        self._unloaded = True
        # A closed loop means the replica is going away, and its engine with it: nothing to free.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_spawn_unload, self.registry, self.name, self.task.key)


def _spawn_unload(registry: Registry, name: str, key: str) -> None:
    task = asyncio.get_running_loop().create_task(registry.unload(name, key))
    _background.add(task)
    task.add_done_callback(_background.discard)


class Classifier:
    """One backbone and the tasks Serve sends it; the single server's engine, registry, batcher, preprocessor.

    Args:
        settings: The service settings (the ray_* fields are read by `build_app`).
    """

    async def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine = await asyncio.to_thread(Engine.from_settings, settings, self.metrics)
        self.registry = Registry(settings.store, self.engine)
        if settings.warmup:
            await self.engine.warm_up([])
        self.batcher: Batcher[BatchItem, TopK] = Batcher(
            self.engine.run, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.queue_size, on_batch=lambda size, waits: _observe_batch(self.metrics, size, waits),
            on_depth=self.metrics.queue_depth.set)
        self.batcher.start()
        self.preprocessor = Preprocessor(settings.preprocess_workers, settings.max_pixels, settings.max_request_pixels)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._catalog: dict[str, tuple[tuple[int, ...] | None, TaskDetail]] = {}
        self._warm = False

        async def load_task(name: str) -> _Slot:  # a plain function: Serve stores its LRU on it
            return _Slot(self.registry, name)

        self._task = serve.multiplexed(max_num_models_per_replica=settings.ray_tasks_per_replica)(load_task)

    async def classify(self, task: str, images: list[bytes], top_k: int) -> Reply:
        """Classify encoded images under a task (Serve routed the call here by its multiplexed id).

        Args:
            task: Task name (equal to the multiplexed model id).
            images: Encoded images.
            top_k: Classes per image.
        """
        start = time.perf_counter()
        loaded = await (await self._task(task)).current()
        if not self._warm and self.settings.warmup:
            # The single server warms up (and times its strategies) on its tasks before it is ready;
            # a replica starts with none, so it does so on the first task it is sent.
            self._warm = True
            await self.engine.warm_up([loaded])
        tensors = await self.preprocessor.decode_many(images, loaded.transform, scale_size(loaded.data_config))
        predictions = await asyncio.gather(*self.batcher.submit_many([BatchItem(loaded, t, top_k) for t in tensors]))
        answer = classify_response(loaded, self.engine.fingerprint, time.perf_counter() - start, predictions)
        return Reply(answer.model_dump(), self.replica, sorted(self.registry.tasks))

    async def catalog(self) -> dict[str, Any]:
        """GET /tasks: the backbone and every task in the store, servable (`loaded`) or refused (`skipped`)."""
        details = [await self._detail(name) for name in self.registry.stored_names()]
        ordered = sorted(details, key=lambda d: (d.state != "loaded", d.name))  # as the single server lists them
        tasks = [TaskInfo(**d.model_dump(include=set(TaskInfo.model_fields))) for d in ordered]
        return TaskList(backbone=backbone_info(self.engine, self.settings), tasks=tasks).model_dump()

    async def detail(self, name: str) -> dict[str, Any]:
        """GET /tasks/NAME.

        Args:
            name: Task name.
        """
        if name not in self.registry.stored_names():
            raise UnknownTask(f"unknown task {name!r}", tasks=self.registry.stored_names())
        return (await self._detail(name)).model_dump()

    async def ready(self) -> int:
        """The number of task folders in the store (each servable on demand)."""
        return len(self.registry.stored_names())

    async def __del__(self) -> None:
        """Serve awaits this when it stops the replica (after draining its requests)."""
        await self.batcher.close()
        self.preprocessor.close()
        self.engine.close()

    async def _detail(self, name: str) -> TaskDetail:
        # Validating an adapter reads its weights: remember the answer until the files change.
        signature = _signature(self.registry.store / name)
        cached = self._catalog.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            if not valid_name(name):
                raise InvalidAdapter(f"task name {name!r} does not match {NAME_PATTERN}")
            detail = task_detail(await self.registry.inspect(name))
        except (InvalidAdapter, UnknownTask) as exc:
            detail = TaskDetail(name=name, state="skipped", reason=exc.detail)
        self._catalog[name] = (signature, detail)
        return detail


class Ingress:
    """HTTP in, classifier calls out: the single server's routes, with the task as Serve's multiplexed id.

    Args:
        classifier: Handle of the Classifier deployment.
        settings: The service settings (body limits).
    """

    def __init__(self, classifier: DeploymentHandle, settings: Settings) -> None:
        self.classifier = classifier
        self.settings = settings
        self.metrics = Metrics()
        self.per_replica = Counter("rlrr_replica_requests_total", "Classify requests by classifier replica and task.",
                                   ["replica", "task"], registry=self.metrics.registry)
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.held: dict[str, list[str]] = {}

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve calls this in the replica after __init__: the app's routes close over this instance.
        return _ingress_api(self)

    async def classify(self, request: Request, task: str, top_k: int) -> tuple[ClassifyResponse, str]:
        """Read the images, run them on a replica that holds the task; the answer and that replica's id.

        Args:
            request: The HTTP request (its body holds the images).
            task: Task name (validated by the route).
            top_k: Classes per image.
        """
        start = time.perf_counter()
        images = await read_images(request, self.settings.max_body_bytes, self.settings.max_images,
                                   self.settings.body_timeout_s)
        call = self.classifier.options(multiplexed_model_id=task).classify.remote(task, images, top_k)
        reply: Reply = await _unwrap(call)
        self.counts[reply.replica][task] += 1
        self.held[reply.replica] = reply.held
        self.per_replica.labels(reply.replica, task).inc()
        answer = ClassifyResponse(**{**reply.answer, "time_ms": round((time.perf_counter() - start) * 1000, 3)})
        return answer, reply.replica

    async def ready(self) -> int:
        """The number of tasks in the store, once a classifier replica answers (503 after READY_TIMEOUT_S)."""
        call = self.classifier.ready.remote()
        try:
            return await asyncio.wait_for(_unwrap(call), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            call.cancel()
            raise NotReady("no classifier replica is ready") from None

    def replicas(self) -> dict[str, Any]:
        """Classify requests per classifier replica and task, and the tasks each replica held last."""
        return {"replicas": {r: {"requests": dict(sorted(c.items())), "tasks_held": self.held.get(r, [])}
                             for r, c in sorted(self.counts.items())}}


def _ingress_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica: same paths, parameters, errors and metrics as `create_app`.

    Args:
        ingress: The replica's Ingress instance.
    """
    api = FastAPI(title="rlrr-serve on Ray Serve", summary="One frozen ViT per replica, many RLRR task adapters.",
                  version="0.1.0")
    api.state.metrics = ingress.metrics  # read by the request middleware, as in the single server
    install_handlers(api)
    api.middleware("http")(_record_request)

    @api.post("/classify", response_model=ClassifyResponse)
    async def classify(
        request: Request,
        response: Response,
        task: Annotated[str, Query(pattern=NAME_PATTERN, max_length=NAME_MAX, description="Task name.")],
        top_k: Annotated[int, Query(ge=1, le=1000, description="Classes per image.")] = 5,
    ) -> ClassifyResponse:
        """Classify a raw image body, or multipart `file` fields, under one task."""
        request.state.task = task
        answer, replica = await ingress.classify(request, task, top_k)
        response.headers[REPLICA_HEADER] = replica
        return answer

    @api.get("/tasks", response_model=TaskList)
    async def list_tasks() -> TaskList:
        """The backbone, every task in the store, and every refused one with its reason."""
        return TaskList(**await _unwrap(ingress.classifier.catalog.remote()))

    @api.get("/tasks/{name}", response_model=TaskDetail)
    async def show_task(name: Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]) -> TaskDetail:
        """One task: labels, configuration, training metrics; or why it was refused."""
        return TaskDetail(**await _unwrap(ingress.classifier.detail.remote(name)))

    @api.get("/replicas")
    async def replicas() -> dict[str, Any]:
        """Classify requests per classifier replica and task (as seen by this ingress replica)."""
        return ingress.replicas()

    @api.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The ingress is alive."""
        return Health(status="ok")

    @api.get("/readyz", response_model=Health)
    async def readyz() -> Health:
        """A classifier replica answers."""
        return Health(status="ready", tasks=await ingress.ready())

    @api.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format: HTTP metrics and per-replica request counts of this ingress replica."""
        return Response(ingress.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return api


async def _unwrap(call: DeploymentResponse) -> Any:
    # A client error raised in a classifier replica (unknown task, bad image) is re-raised here as
    # itself, so the same exception table answers with the same status and body.
    try:
        return await call
    except RayTaskError as exc:
        if isinstance(exc.cause, AppError):
            raise exc.cause from None
        raise


def classifier_options(settings: Settings) -> dict[str, Any]:
    """Serve options of the Classifier deployment: replicas or autoscaling, and resources per replica.

    Args:
        settings: The service settings.
    """
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.ray_cpus, "num_gpus": settings.ray_gpus},
        # Room for a few full batches per replica: the batcher, not Serve, should be what fills a batch.
        "max_ongoing_requests": max(2 * settings.max_batch_size, 8),
    }
    if settings.ray_max_replicas is not None and settings.ray_max_replicas > settings.ray_replicas:
        options["autoscaling_config"] = {"min_replicas": settings.ray_replicas,
                                         "max_replicas": settings.ray_max_replicas,
                                         "target_ongoing_requests": settings.ray_target_requests}
    else:
        options["num_replicas"] = settings.ray_replicas
    return options


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application; `args` override RLRR_* settings (`serve run ... key=value`, `args:` in serve.yaml).

    Args:
        args: Settings fields, e.g. {"store": "/mnt/store", "ray_replicas": 2}.
    """
    settings = Settings(**(args or {}))
    # Every replica builds its backbone from this spec (backbone, checkpoint, backbone_kwargs, seed):
    # built here once so kwargs a spec cannot hold fail the deploy, not each replica's start-up.
    settings.backbone_spec()
    # Replicas may start in another working directory (or on another node sharing the store's path).
    settings.store = settings.store.resolve()
    if settings.checkpoint is not None:
        settings.checkpoint = settings.checkpoint.resolve()
    classifier = serve.deployment(Classifier).options(**classifier_options(settings)).bind(settings)
    ingress = serve.deployment(serve.ingress()(Ingress)).options(
        num_replicas=settings.ray_ingress_replicas, ray_actor_options={"num_cpus": 0})
    return ingress.bind(classifier, settings)


def __getattr__(name: str) -> Any:
    # `serve run app.ray_serve:app`: built on access, so importing this module reads no settings.
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
