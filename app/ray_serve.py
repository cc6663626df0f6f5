"""The same HTTP API on Ray Serve: many replicas, each with one backbone; tasks are multiplexed models.

    serve run app.ray_serve:app                                  # settings from RLRR_* env vars
    serve run app.ray_serve:build_app ray_replicas=4 ray_gpus=0.5
    serve deploy deploy/serve.yaml                               # on a running Ray cluster

Two deployments. `Ingress` (no model, no GPU) serves the single server's routes, built by the same
factory (`app.main.build_api`), over `Replicas`, which calls `Classifier` with the task name as the
multiplexed model id, so Serve routes a task's requests to replicas that already hold it. Each
`Classifier` replica holds the single server's `Service` (app.service) over the shared store, with the
same tiers: every config read at start, a task made resident on its first request on that replica, the
least recently used evicted past `resident_bytes` (a byte budget per replica, not a task count).

Every classify answer names its replica (`x-rlrr-replica` header); `GET /replicas` counts requests per
replica and task as seen by this ingress replica. Admin uploads are not routed here: write adapters
into the store (`python -m trainer ...`); replicas pick up new and changed adapters on the next request.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from prometheus_client import Counter
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from app.errors import AppError, NotReady
from app.main import ROUTERS, build_api
from app.metrics import Metrics
from app.schemas import ClassifyResponse, TaskDetail, TaskList
from app.service import Service
from app.settings import Settings

READY_TIMEOUT_S = 5.0  # /readyz answers 503 rather than hang while no classifier replica is up
REPLICA_HEADER = "x-rlrr-replica"
HELD_SHOWN = 100  # resident task names a reply (and /replicas) lists per replica
# The replica that answered this request, for the header (set by `Replicas.classify`, read by `_name_replica`).
_answered_by: contextvars.ContextVar[list[str]] = contextvars.ContextVar("answered_by")


@dataclass
class Reply:
    """A classifier replica's answer to one /classify call.

    Attributes:
        answer: The `ClassifyResponse` fields.
        replica: Serve's unique id of the replica that ran it.
        held: Tasks resident on that replica after the call (the first HELD_SHOWN by name).
        resident: How many tasks are resident there.
    """

    answer: dict[str, Any]
    replica: str
    held: list[str] = field(default_factory=list)
    resident: int = 0


class Classifier:
    """One backbone and the tasks Serve sends it: a `Service` that loads each task on demand.

    Args:
        settings: The service settings (the ray_* fields are read by `build_app`).
    """

    async def __init__(self, settings: Settings) -> None:
        self.service = Service(settings, watch_store=True)
        await self.service.start()
        self.replica = serve.get_replica_context().replica_id.unique_id

        async def held(name: str) -> str:  # a plain function: Serve stores its LRU on it
            # Only the routing hint (which ids this replica advertises); memory is the registry's budget.
            return name

        self._task = serve.multiplexed(max_num_models_per_replica=settings.ray_tasks_per_replica)(held)

    async def classify(self, task: str, images: list[bytes], top_k: int) -> Reply:
        """Classify encoded images under a task (Serve routed the call here by its multiplexed id).

        Args:
            task: Task name (equal to the multiplexed model id).
            images: Encoded images.
            top_k: Classes per image.
        """
        start = time.perf_counter()
        await self._task(task)
        loaded = await self.service.load_task(task)  # resident on this replica, reread if the store changed
        answer = await self.service.answer(loaded, images, top_k, since=start)
        resident = self.service.registry.tasks
        return Reply(answer.model_dump(), self.replica, sorted(resident)[:HELD_SHOWN], len(resident))

    async def catalog(self, limit: int, cursor: str | None, name: str | None) -> dict[str, Any]:
        """GET /tasks: a page of the store's tasks, servable (`loaded`, with this replica's tier) or refused.

        Args:
            limit: Most tasks in the page.
            cursor: The previous page's `next_cursor`.
            name: Only names containing this.
        """
        return (await self.service.catalog(limit, cursor, name)).model_dump()

    async def detail(self, name: str) -> dict[str, Any]:
        """GET /tasks/NAME.

        Args:
            name: Task name.
        """
        return (await self.service.detail(name)).model_dump()

    async def ready(self) -> int:
        """The number of task folders in the store (each servable on demand)."""
        return await self.service.readiness()

    async def __del__(self) -> None:
        """Serve awaits this when it stops the replica (after draining its requests)."""
        await self.service.close()


class Replicas:
    """The ingress's service: every call goes to a classifier replica, a task's to one that holds it.

    Args:
        classifier: Handle of the Classifier deployment.
        settings: The service settings (body limits).
    """

    def __init__(self, classifier: DeploymentHandle, settings: Settings) -> None:
        self.classifier = classifier
        self.settings = settings
        self.metrics = Metrics(per_task=settings.task_metrics)
        labels = ["replica", "task"] if settings.task_metrics else ["replica"]  # per task: opt-in (metrics.py)
        self.per_replica = Counter("rlrr_replica_requests_total", "Classify requests by classifier replica "
                                   "(and task with RLRR_TASK_METRICS).", labels, registry=self.metrics.registry)
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.held: dict[str, list[str]] = {}
        self.resident: dict[str, int] = {}

    async def start(self) -> None:
        """Nothing to start: the replicas hold the backbones."""

    async def close(self) -> None:
        """Nothing to free."""

    def admit(self, task: str) -> None:
        """Nothing to check before the body is read: the replica that gets the task knows it.

        Args:
            task: Task name.
        """

    async def classify(self, task: str, images: Sequence[bytes], top_k: int,
                       since: float | None = None) -> ClassifyResponse:
        """Run the images on a replica that holds the task (Serve's multiplexed id); count the replica.

        Args:
            task: Task name.
            images: Encoded images.
            top_k: Classes per image.
            since: `time.perf_counter()` when the request arrived; now when None.
        """
        since = time.perf_counter() if since is None else since
        call = self.classifier.options(multiplexed_model_id=task).classify.remote(task, list(images), top_k)
        reply: Reply = await _unwrap(call)
        self.counts[reply.replica][task] += 1
        self.held[reply.replica] = reply.held
        self.resident[reply.replica] = reply.resident
        self.per_replica.labels(*([reply.replica, task] if self.metrics.per_task else [reply.replica])).inc()
        _answered_by.get([]).append(reply.replica)
        return ClassifyResponse(**{**reply.answer, "time_ms": round((time.perf_counter() - since) * 1000, 3)})

    async def catalog(self, limit: int = 100, cursor: str | None = None, name: str | None = None) -> TaskList:
        """A page of the store's tasks, as a classifier replica sees them.

        Args:
            limit: Most tasks in the page.
            cursor: The previous page's `next_cursor`.
            name: Only names containing this.
        """
        return TaskList(**await _unwrap(self.classifier.catalog.remote(limit, cursor, name)))

    async def detail(self, name: str) -> TaskDetail:
        """One task, as a classifier replica sees it.

        Args:
            name: Task name.
        """
        return TaskDetail(**await _unwrap(self.classifier.detail.remote(name)))

    async def readiness(self) -> int:
        """The number of tasks in the store, once a classifier replica answers (503 after READY_TIMEOUT_S)."""
        call = self.classifier.ready.remote()
        try:
            return await asyncio.wait_for(_unwrap(call), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            call.cancel()
            raise NotReady("no classifier replica is ready") from None

    def replicas(self) -> dict[str, Any]:
        """Classify requests per classifier replica and task, and the tasks each replica held last."""
        return {"replicas": {r: {"requests": dict(sorted(c.items())), "tasks_held": self.held.get(r, []),
                                 "tasks_resident": self.resident.get(r, 0)}
                             for r, c in sorted(self.counts.items())}}


def _get_replicas(request: Request) -> Replicas:
    return request.app.state.service


replicas_router = APIRouter(tags=["ray"])


@replicas_router.get("/replicas")
async def replicas(front: Annotated[Replicas, Depends(_get_replicas)]) -> dict[str, Any]:
    """Classify requests per classifier replica and task (as seen by this ingress replica)."""
    return front.replicas()


async def _name_replica(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    answered_by: list[str] = []
    token = _answered_by.set(answered_by)  # the route runs in a copy of this context: it sees the list
    try:
        response = await call_next(request)
    finally:
        _answered_by.reset(token)
    if answered_by:
        response.headers[REPLICA_HEADER] = answered_by[0]
    return response


class Ingress:
    """HTTP in, classifier calls out: the single server's routes (no admin ones) over `Replicas`.

    Args:
        classifier: Handle of the Classifier deployment.
        settings: The service settings (body limits).
    """

    def __init__(self, classifier: DeploymentHandle, settings: Settings) -> None:
        self.replicas = Replicas(classifier, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Serve calls this in the replica after __init__: the app is built by the single server's factory.
        api = build_api(self.replicas, (*ROUTERS, replicas_router),
                        title="rlrr-serve on Ray Serve", summary="One frozen ViT per replica, many RLRR task adapters.")
        api.middleware("http")(_name_replica)
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
