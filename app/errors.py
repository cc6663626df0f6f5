"""Domain exceptions and the one table that maps them to HTTP.

The engine, registry and request parsing raise these; only `install_handlers` knows about HTTP.
Every response body is `{"detail": <reason>, ...extra}`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match

log = logging.getLogger("app")



class ErrorResponse(BaseModel):
    """Every error answer: a one-line reason, plus fields some errors add."""

    detail: str = Field(description="What is wrong, in one line.")
    tasks: list[str] | None = Field(None, description="Unknown task (404): the tasks that are served.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="Invalid parameters (422): one entry per problem, with `loc`, `msg` and `type`."
    )


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


class AdapterFailure(AppError):
    """A served adapter produced no usable answer for an input (e.g. non-finite scores); a server-side fault."""


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
    AdapterFailure: 500,
}


DESCRIPTIONS = {
    400: "Malformed request, or an image that cannot be decoded.",
    401: "No bearer token.",
    403: "Wrong token, or the admin API is disabled.",
    404: "Unknown task.",
    408: "The body did not arrive in time.",
    413: "Body, image, pixel budget or image count over its limit, or more images than the queue holds.",
    415: "Content type or image format not accepted.",
    422: "Invalid parameter, or an adapter that fails validation.",
    500: "A server bug, or an adapter that produced no usable scores for an image (logged); the connection "
         "stays usable.",
    503: "Queue full, out of memory, or not ready; see Retry-After.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error statuses, all with the `ErrorResponse` body.

    Args:
        codes: HTTP status codes the route can answer.
    """
    return {code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]} for code in codes}


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


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    # `detail` is a string here too (FastAPI sends a list): one schema for every error.
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    reason = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5]) or "invalid request"
    return JSONResponse({"detail": f"invalid request: {reason}", "errors": errors}, status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Starlette lists the methods of the first route of the path only
        headers["Allow"] = ", ".join(allowed_methods(request))
    # Under /v2 even the router's own 404/405 (no route matched) speak the protocol's `{"error"}`.
    key = "error" if request.url.path == V2_PREFIX or request.url.path.startswith(f"{V2_PREFIX}/") else "detail"
    return JSONResponse({key: str(exc.detail)}, status_code=exc.status_code, headers=headers)


V2_PREFIX = "/v2"  # the Open Inference Protocol's routes (app.routes.v2)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app accepts on the request's path.

    Args:
        request: The request.
    """
    # Probing each method works whatever the nesting of included routers.
    allowed = [method for method in _METHODS
               if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                      for route in request.app.router.routes)]
    if "GET" in allowed and "HEAD" not in allowed:  # HEAD is answered wherever GET is (app.main)
        allowed.insert(allowed.index("GET") + 1, "HEAD")
    return allowed


_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


def install_handlers(app: FastAPI) -> None:
    """Register the domain-error table on an app.

    Args:
        app: The FastAPI application.
    """
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
