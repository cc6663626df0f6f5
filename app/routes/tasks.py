"""/tasks: what is served (`router`), and with the admin token uploading and deleting adapters (`admin`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from app.deps import AdminDep, FrontDep, ServiceDep, SettingsDep
from app.errors import error_responses
from app.payloads import adapter_files, form_field, read_files
from app.peft_upload import parse_labels
from app.registry import NAME_MAX, NAME_PATTERN
from app.schemas import TaskDetail, TaskList

router = APIRouter(prefix="/tasks", tags=["tasks"])
admin = APIRouter(prefix="/tasks", tags=["tasks"], dependencies=[AdminDep])
TaskName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]
_UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["config", "weights"], "properties": {
        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"},
        "labels": {"type": "string", "description": "PEFT adapters: a JSON array of class names"}}}}}}}


@router.get("", response_model=TaskList, responses=error_responses(422))
async def list_tasks(
    service: FrontDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most tasks in the page.")] = 100,
    cursor: Annotated[str | None, Query(max_length=NAME_MAX, description="`next_cursor` of the previous page.")] = None,
    name: Annotated[str | None, Query(max_length=NAME_MAX, description="Only names containing this.")] = None,
) -> TaskList:
    """The backbone and one page of the store's tasks in name order: servable (with their tier) or refused
    (with the reason). Follow `next_cursor` for the next page."""
    return await service.catalog(limit, cursor, name)


@router.get("/{name}", response_model=TaskDetail, responses=error_responses(404, 422))
async def show_task(name: TaskName, service: FrontDep) -> TaskDetail:
    """One task: labels, configuration, training metrics; or why it was refused."""
    return await service.detail(name)


@admin.put("/{name}", response_model=TaskDetail, openapi_extra=_UPLOAD,
           responses=error_responses(400, 401, 403, 408, 413, 415, 422, 503))
async def upload_task(
    name: TaskName, request: Request, service: ServiceDep, settings: SettingsDep,
    pinned: Annotated[bool, Query(description="Never evict it (until restart, or an upload without it).")] = False,
) -> TaskDetail:
    """Validate an adapter (multipart `config` + `weights`; a PEFT folder's two files also take
    `labels`, a JSON array of class names), store it atomically, serve it now (resident)."""
    parts = await read_files(request, settings.max_body_bytes, settings.body_timeout_s)
    config, weights = adapter_files(parts)
    return await service.add_task(name, config, weights, labels=parse_labels(form_field(parts, "labels")),
                                  pinned=pinned)


@admin.delete("/{name}", status_code=204, response_class=Response, responses=error_responses(401, 403, 404, 422))
async def delete_task(name: TaskName, service: ServiceDep) -> Response:
    """Stop serving a task and remove it from the store."""
    await service.remove_task(name)
    return Response(status_code=204)
