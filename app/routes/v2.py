"""The Open Inference Protocol (KServe V2): health, metadata and infer, every task as a model.

Infer takes the same path as /classify (same batcher, limits, errors and metrics); errors are
`{"error": "..."}`. Wire format: app/oip.py.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from app.deps import ServiceDep, SettingsDep
from app.errors import UnknownTask
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
from app.tasks import LoadedTask

# "4XX" too: every client error is the protocol's body (invalid parameters answer 400, not FastAPI's 422)
_ERRORS = {status: {"model": ErrorBody} for status in (400, 404, 413, 415, 503, "4XX")}
_VERSION = {"parameters": [{"name": "version", "in": "path", "required": True, "description": "Adapter version",
                            "schema": {"type": "string"}}]}  # read by `served_task` from the path
router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], route_class=OIPRoute, responses=_ERRORS)
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": inline_schema(InferRequest)},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                            "description": f"JSON header of {HEADER_LENGTH} bytes, then tensor data"}},
}}}


async def served_task(request: Request, service: ServiceDep,
                task: Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]) -> LoadedTask:
    """The task named in the path (made resident if only stored), at the version in the path if there is one.

    Args:
        request: The request (its `version` path parameter, and `state.task` for metrics).
        service: The service.
        task: Task name.
    """
    loaded = await service.load_task(task)
    request.state.task = task
    version = request.path_params.get("version")
    if version is not None and version != loaded.version:
        raise UnknownTask(f"task {task!r} has no version {version!r}; it serves {loaded.version!r}")
    return loaded


TaskDep = Annotated[LoadedTask, Depends(served_task)]


@router.get("/health/live", response_model=ServerLive)
async def live() -> ServerLive:
    """The process is alive."""
    return ServerLive(live=True)


@router.get("/health/ready", response_model=ServerReady)
async def ready(service: ServiceDep) -> ServerReady:
    """Every task is loaded and warmed up (503 while starting or stopping)."""
    await service.readiness()
    return ServerReady(ready=True)


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(name=request.app.title, version=request.app.version, extensions=["binary_tensor_data"])


@router.get("/models/{task}", response_model=ModelMetadata)
@router.get("/models/{task}/versions/{version}", response_model=ModelMetadata, openapi_extra=_VERSION)
async def metadata(task: TaskDep) -> ModelMetadata:
    """A task as a model: input `image` (BYTES), outputs `labels` (BYTES) and `scores` (FP32)."""
    return model_metadata(task.name, task.version)


@router.get("/models/{task}/ready", response_model=ModelReady)
@router.get("/models/{task}/versions/{version}/ready", response_model=ModelReady, openapi_extra=_VERSION)
async def model_ready(task: TaskDep) -> ModelReady:
    """The task is served (404 when it is not)."""
    return ModelReady(name=task.name, ready=True)


@router.post("/models/{task}/infer", response_class=Response, openapi_extra=_INFER_BODY)
@router.post("/models/{task}/versions/{version}/infer", response_class=Response,
             openapi_extra={**_INFER_BODY, **_VERSION})
async def infer(request: Request, task: TaskDep, service: ServiceDep, settings: SettingsDep) -> Response:
    """Top-k `labels` and `scores` ([images, top_k]) of each element of the BYTES input `image`."""
    call = parse_request(await read_body(request, settings.max_body_bytes), request.headers)
    k, images = call.top_k(), call.images()
    check_images(images, settings.max_images)
    predictions = await service.predict(task, images, k)
    return infer_response(call, task.name, task.version, task.adapter.labels, predictions)
