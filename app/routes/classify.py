"""POST /classify: images in, top-k classes of one task out."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.deps import FrontDep, SettingsDep
from app.errors import error_responses
from app.payloads import read_images
from app.registry import NAME_MAX, NAME_PATTERN
from app.schemas import ClassifyResponse

router = APIRouter(tags=["classify"])

_IMAGE = {"schema": {"type": "string", "format": "binary"}}
_BODY = {"requestBody": {"required": True, "content": {
    "image/jpeg": _IMAGE, "image/png": _IMAGE, "image/webp": _IMAGE,
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}


@router.post("/classify", response_model=ClassifyResponse, openapi_extra=_BODY,
             responses=error_responses(400, 404, 408, 413, 415, 422, 503))
async def classify(
    request: Request,
    task: Annotated[str, Query(pattern=NAME_PATTERN, max_length=NAME_MAX, description="Task name.")],
    service: FrontDep,
    settings: SettingsDep,
    top_k: Annotated[int, Query(ge=1, le=1000, description="Classes per image.")] = 5,
) -> ClassifyResponse:
    """Classify a raw image body, or multipart `file` fields, under one task."""
    start = time.perf_counter()
    service.admit(task)  # unknown task, full queue: refused before reading and decoding anything
    request.state.task = task
    images = await read_images(request, settings.max_body_bytes, settings.max_images, settings.body_timeout_s)
    return await service.classify(task, images, top_k, since=start)
