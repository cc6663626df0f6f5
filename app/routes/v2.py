"""The Open Inference Protocol (KServe V2): health, metadata and infer, every task as a model.

Infer takes the same path as /classify (same batcher, limits, errors and metrics); errors are
`{"error": "..."}`. Wire format: app/oip.py. The routes call the `Front` (app.service), as /classify
does, so the single server and the Ray ingress both serve them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from app.deps import FrontDep, SettingsDep
from app.errors import V2_PREFIX, UnknownTask
from app.oip import (
    HEADER_LENGTH,
    ErrorBody,
    InferRequest,
    ModelMetadata,
    ModelReady,
    OIPRoute,
    ServerLive,
    ServerMetadata,
    ServerReady,
    infer_response,
    inline_schema,
    model_metadata,
    parse_request,
)
from app.payloads import check_images, read_body
from app.registry import NAME_MAX, NAME_PATTERN
from app.schemas import ClassifyResponse, TaskDetail

# "4XX" too: every client error is the protocol's body (invalid parameters answer 400, not FastAPI's 422)
_ERRORS = {status: {"model": ErrorBody} for status in (400, 404, 408, 413, 415, 503, "4XX")}
_VERSION = {"parameters": [{"name": "version", "in": "path", "required": True, "description": "Adapter version",
                            "schema": {"type": "string"}}]}  # read by `served_task` from the path
router = APIRouter(prefix=V2_PREFIX, tags=["v2 (Open Inference Protocol)"], route_class=OIPRoute, responses=_ERRORS)
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(InferRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"JSON header of {HEADER_LENGTH} bytes, then tensor data"}},
}}}


TaskName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]


def _check_version(request: Request, task: str, served: str | None) -> None:
    version = request.path_params.get("version")
    if version is not None and version != served:
        raise UnknownTask(f"task {task!r} has no version {version!r}; it serves {served!r}")


async def served_task(request: Request, front: FrontDep, task: TaskName) -> TaskDetail:
    """The task named in the path, at the version in the path if there is one.

    Args:
        request: The request (its `version` path parameter, and `state.task` for metrics).
        front: The service, or the Ray ingress's proxy of its replicas.
        task: Task name.
    """
    detail = await front.detail(task)  # UnknownTask (404) when the store has no such task
    request.state.task = task
    if detail.state != "loaded":
        raise UnknownTask(f"task {task!r} is not served: {detail.reason}")
    _check_version(request, task, detail.version)
    return detail


TaskDep = Annotated[TaskDetail, Depends(served_task)]


@router.get("/health/live", response_model=ServerLive)
async def live() -> ServerLive:
    """The process is alive."""
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady)
async def ready(front: FrontDep) -> ServerReady:
    """Every task is loaded and warmed up (503 while starting or stopping)."""
    await front.readiness()
    return ServerReady(ready=True)


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(name=request.app.title, version=request.app.version, extensions=["binary_tensor_data"])


@router.get("/models/{task}", response_model=ModelMetadata)
@router.get("/models/{task}/versions/{version}", response_model=ModelMetadata, openapi_extra=_VERSION)
async def metadata(task: TaskDep) -> ModelMetadata:
    """A task as a model: input `image` (BYTES), outputs `labels` (BYTES) and `scores` (FP32)."""
    return model_metadata(task.name, task.version or "")


@router.get("/models/{task}/ready", response_model=ModelReady)
@router.get("/models/{task}/versions/{version}/ready", response_model=ModelReady, openapi_extra=_VERSION)
async def model_ready(task: TaskDep) -> ModelReady:
    """The task is served (404 when it is not)."""
    return ModelReady(name=task.name, ready=True)


@router.post("/models/{task}/infer", response_class=Response, openapi_extra=_INFER_BODY)
@router.post("/models/{task}/versions/{version}/infer", response_class=Response,
             openapi_extra={**_INFER_BODY, **_VERSION})
async def infer(request: Request, task: TaskName, front: FrontDep, settings: SettingsDep) -> Response:
    """Top-k `labels` and `scores` ([images, top_k]) of each element of the BYTES input `image`."""
    front.admit(task)  # as /classify: unknown task (404) or a full queue (503) before the body is read
    request.state.task = task
    call = parse_request(await read_body(request, settings.max_body_bytes, settings.body_timeout_s), request.headers)
    k, images = call.top_k(), call.images()
    check_images(images, settings.max_images)
    answer = await front.classify(task, images, k)
    # The version is the one that answered: a task replaced in between is not passed off as the asked one.
    _check_version(request, task, answer.adapter_version)
    return infer_response(call, task, answer.adapter_version, *_top_k(answer))


def _top_k(answer: ClassifyResponse) -> tuple[dict[int, str], list[list[tuple[int, float]]]]:
    """The answer's labels by class index, and its (index, score) pairs per image."""
    rows = [result.predictions for result in answer.results]
    labels = {p.index: p.label for row in rows for p in row}
    return labels, [[(p.index, p.score) for p in row] for row in rows]
