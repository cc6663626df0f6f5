"""/tasks: what is served, and (with the admin token) uploading and deleting adapters."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from app.deps import AdminDep, EngineDep, RegistryDep, SettingsDep
from app.errors import error_responses
from app.payloads import adapter_files, read_files
from app.registry import NAME_MAX, NAME_PATTERN
from app.schemas import TaskDetail, TaskInfo, TaskList, backbone_info, task_detail, task_info

router = APIRouter(prefix="/tasks", tags=["tasks"])
TaskName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=NAME_MAX)]
_UPLOAD = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["config", "weights"], "properties": {
        "config": {"type": "string", "format": "binary", "description": "adapter_config.json"},
        "weights": {"type": "string", "format": "binary", "description": "adapter_model.safetensors"}}}}}}}


@router.get("", response_model=TaskList)
async def list_tasks(registry: RegistryDep, engine: EngineDep, settings: SettingsDep) -> TaskList:
    """The backbone, every served task, and every refused one with its reason."""
    backbone = backbone_info(engine, settings)
    skipped = [TaskInfo(name=n, state="skipped", reason=r) for n, r in sorted(registry.skipped.items())]
    return TaskList(backbone=backbone, tasks=[task_info(t) for _, t in sorted(registry.tasks.items())] + skipped)


@router.get("/{name}", response_model=TaskDetail, responses=error_responses(404, 422))
async def show_task(name: TaskName, registry: RegistryDep) -> TaskDetail:
    """One task: labels, configuration, training metrics; or why it was refused."""
    if name in registry.skipped:
        return TaskDetail(name=name, state="skipped", reason=registry.skipped[name])
    return task_detail(registry.get(name))


@router.put("/{name}", response_model=TaskDetail, dependencies=[AdminDep], openapi_extra=_UPLOAD,
            responses=error_responses(400, 401, 403, 408, 413, 415, 422, 503))
async def upload_task(name: TaskName, request: Request, registry: RegistryDep, settings: SettingsDep) -> TaskDetail:
    """Validate an adapter (multipart `config` + `weights`), store it atomically, serve it now."""
    config, weights = adapter_files(await read_files(request, settings.max_body_bytes, settings.body_timeout_s))
    return task_detail(await registry.install(name, config, weights))


@router.delete("/{name}", status_code=204, dependencies=[AdminDep], response_class=Response,
               responses=error_responses(401, 403, 404, 422))
async def delete_task(name: TaskName, registry: RegistryDep) -> Response:
    """Stop serving a task and remove it from the store."""
    await registry.delete(name)
    return Response(status_code=204)
