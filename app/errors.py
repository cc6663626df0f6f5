"""Domain exceptions and the one table that maps them to HTTP.

The engine, registry and request parsing raise these; only `install_handlers` knows about HTTP.
Every response body is `{"detail": <reason>, ...extra}`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger("app")


class AppError(Exception):
    """Base of every error a client can cause; carries a reason and optional extra fields.

    Args:
        detail: Human-readable reason, returned as `detail`.
        headers: Extra response headers (e.g. `Retry-After`).
        extra: Extra JSON fields merged into the body.
    """

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class UnknownTask(AppError):
    """The task is not served (the body lists the tasks that are)."""


class InvalidImage(AppError):
    """The bytes are not a decodable image."""


class UnsupportedMediaType(AppError):
    """The body's content type or image format is not accepted."""


class PayloadTooLarge(AppError):
    """Body over the byte limit, image over the pixel limit, or too many images."""


class BadRequest(AppError):
    """Malformed request (e.g. broken multipart, no image)."""


class RequestTimeout(AppError):
    """The body did not arrive within the read deadline (the connection is closed after the answer)."""


class ClientDisconnected(AppError):
    """The client went away before its body arrived; nobody reads the answer (nginx's 499)."""


class Unauthorized(AppError):
    """Admin call without a bearer token."""


class Forbidden(AppError):
    """Admin call with a wrong token, or the admin API is disabled."""


class InvalidAdapter(AppError):
    """An uploaded adapter failed validation; the store is unchanged."""


class InsufficientMemory(AppError):
    """The server has no memory left for the request (a server limit, not a client error)."""


class Overloaded(AppError):
    """The queue is full; retry later."""


class NotReady(AppError):
    """The service is starting or stopping."""


STATUS: dict[type[AppError], int] = {
    UnknownTask: 404,
    InvalidImage: 400,
    BadRequest: 400,
    RequestTimeout: 408,
    ClientDisconnected: 499,
    UnsupportedMediaType: 415,
    PayloadTooLarge: 413,
    Unauthorized: 401,
    Forbidden: 403,
    InvalidAdapter: 422,
    Overloaded: 503,
    InsufficientMemory: 503,
    NotReady: 503,
}


def status_of(exc: AppError) -> int:
    """The HTTP status of a domain error (400 for an unlisted subclass).

    Args:
        exc: The raised error.
    """
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return JSONResponse({"detail": exc.detail, **exc.extra}, status_code=status_of(exc), headers=exc.headers)


def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """The answer to a bug (any exception that is not an `AppError`): logged with its traceback, never leaked.

    Called by the app's outer middleware, so the 500 is counted and the connection stays usable (Starlette's
    own last-resort handler re-raises, and uvicorn then drops the keep-alive connection).

    Args:
        request: The request that failed.
        exc: The exception.
    """
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal error"}, status_code=500)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected(request, exc)


def install_handlers(app: FastAPI) -> None:
    """Register the domain-error table on an app.

    Args:
        app: The FastAPI application.
    """
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(Exception, _unexpected)
