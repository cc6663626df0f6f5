"""HTTP bodies -> bytes: bounded reading and multipart parsing, shared by /classify and /tasks."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from app.errors import (
    BadRequest,
    ClientDisconnected,
    InvalidAdapter,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)

log = logging.getLogger("app")

RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
Part = tuple[str, str | None, bytes]  # (field name, file name, contents)


def media_type(request: Request) -> str:
    """The request's media type, lower-case, without parameters.

    Args:
        request: The request.
    """
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_count(text: str) -> int | None:
    """A non-negative decimal integer written in ASCII digits only, else None.

    `str.isdigit` also accepts superscripts and other scripts' digits, which `int` then refuses
    (or reads as a different number): every count a client sends is parsed here.

    Args:
        text: The header or parameter value.
    """
    text = text.strip()
    return int(text) if _COUNT.fullmatch(text) else None


_COUNT = re.compile(r"[0-9]{1,19}")


async def read_body(request: Request, limit: int, timeout_s: float | None) -> bytes:
    """The whole body, refusing it as soon as it passes `limit` bytes (never buffers more).

    Args:
        request: The request.
        limit: Largest body accepted.
        timeout_s: The whole body must arrive within this many seconds (408 otherwise): every route
            passes `Settings.body_timeout_s`; None (no deadline) only for in-process callers.
    """
    declared = parse_count(request.headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the limit of {limit}")
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    chunks, size, stream = [], 0, request.stream()
    try:
        while True:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), left)
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"request body not received within {timeout_s:g} s ({size} bytes arrived)",
                             headers={"Connection": "close"}) from None
    except ClientDisconnect:
        # Routine on a flaky network: one line, no traceback.
        log.warning("client disconnected during the body of %s %s after %d bytes",
                    request.method, request.url.path, size)
        raise ClientDisconnected("client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def read_files(request: Request, limit: int, timeout_s: float | None) -> list[Part]:
    """The parts of a bounded multipart/form-data body (files, and plain fields with no filename).

    Args:
        request: The request (must be multipart/form-data).
        limit: Largest body accepted.
        timeout_s: Read deadline of the body (see `read_body`).
    """
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType(f"expected multipart/form-data, got {media_type(request) or 'no content type'!r}")
    body = await read_body(request, limit, timeout_s)
    parser = MultiPartParser(request.headers, _once(body))
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from exc
    parts: list[Part] = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append((field, value.filename, await value.read()))
            else:  # a plain form field (an upload's `labels`)
                parts.append((field, None, value.encode()))
    finally:
        await form.close()
    return parts


async def read_images(request: Request, max_bytes: int, max_images: int,
                      timeout_s: float | None) -> list[bytes]:
    """The encoded images of a /classify request: a raw image body or multipart `file` fields.

    Args:
        request: The request.
        max_bytes: Largest body accepted.
        max_images: Most images accepted.
        timeout_s: Read deadline of the body (see `read_body`).
    """
    kind = media_type(request)
    if kind == "multipart/form-data":
        images = [data for field, _, data in await read_files(request, max_bytes, timeout_s) if field == "file"]
        if not images:
            raise BadRequest("multipart body has no 'file' field")
    elif kind in RAW_IMAGE_TYPES or not kind:
        images = [await read_body(request, max_bytes, timeout_s)]
    else:
        raise UnsupportedMediaType(
            f"content type {kind!r} not accepted: send image/jpeg, image/png or image/webp as the body, "
            "or multipart/form-data with 'file' fields")
    check_images(images, max_images)
    return images


def check_images(images: list[bytes], max_images: int) -> None:
    """Refuse too many images in one request, or an empty one.

    Args:
        images: The encoded images of a request.
        max_images: Most images accepted.
    """
    if not images:
        raise BadRequest("the request holds no image; send at least one")
    if len(images) > max_images:
        raise PayloadTooLarge(f"{len(images)} images in one request; the limit is {max_images}")
    empty = [i for i, data in enumerate(images) if not data]
    if empty:
        raise BadRequest(f"empty image (image {empty[0]} of {len(images)}, counting from 0)" if len(images) > 1
                         else "empty image")


async def _once(body: bytes) -> AsyncGenerator[bytes, None]:
    yield body
    yield b""


def adapter_files(parts: list[Part]) -> tuple[bytes, bytes]:
    """The (config, weights) of an adapter upload: fields `config` and `weights`, or parts named
    adapter_config.json and adapter_model.safetensors.

    Args:
        parts: The file parts of the upload.
    """
    found: dict[str, bytes] = {}
    for field, filename, data in parts:
        if field == "config" or filename == "adapter_config.json":
            found["config"] = data
        elif field == "weights" or filename == "adapter_model.safetensors":
            found["weights"] = data
    missing = [name for name in ("config", "weights") if name not in found]
    if missing:
        raise InvalidAdapter(
            f"upload lacks {missing}: send adapter_config.json as 'config' and adapter_model.safetensors as 'weights'")
    return found["config"], found["weights"]


def form_field(parts: list[Part], name: str) -> bytes | None:
    """The value of one part by field name (the last if sent twice), or None.

    Args:
        parts: The parts of an upload.
        name: The field, e.g. `labels`.
    """
    found = [data for field, _, data in parts if field == name]
    return found[-1] if found else None
