"""One-line accessors from `app.state`, as `Annotated` aliases for route signatures."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import Forbidden, Unauthorized
from app.metrics import Metrics
from app.service import Front, Service
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_front(request: Request) -> Front:
    return request.app.state.service


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_metrics(request: Request) -> Metrics:
    return request.app.state.service.metrics


# Declares the scheme in OpenAPI; the checks (and their 401/403 answers) are ours, below.
bearer = HTTPBearer(auto_error=False, scheme_name="admin", description="RLRR_ADMIN_TOKEN")


def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Admin calls need `Authorization: Bearer <RLRR_ADMIN_TOKEN>`; none are allowed without a token set.

    Args:
        settings: The app settings.
        credentials: The bearer token, when the request has one.
    """
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise Forbidden("admin API disabled: no RLRR_ADMIN_TOKEN configured")
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("admin call needs 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials.credentials.strip().encode(),
                                  settings.admin_token.get_secret_value().encode()):
        raise Forbidden("wrong admin token")


SettingsDep = Annotated[Settings, Depends(get_settings)]
FrontDep = Annotated[Front, Depends(get_front)]  # the routes both front-ends mount
ServiceDep = Annotated[Service, Depends(get_service)]  # the routes only the single server mounts
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AdminDep = Depends(require_admin)
