"""One-line accessors from `app.state`, as `Annotated` aliases for route signatures."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.batcher import Batcher
from app.engine import BatchItem, Engine, TopK
from app.errors import Forbidden, Unauthorized
from app.metrics import Metrics
from app.preprocess import Preprocessor
from app.registry import Registry
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_batcher(request: Request) -> Batcher[BatchItem, TopK]:
    return request.app.state.batcher


def get_preprocessor(request: Request) -> Preprocessor:
    return request.app.state.preprocessor


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


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
EngineDep = Annotated[Engine, Depends(get_engine)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
BatcherDep = Annotated[Batcher[BatchItem, TopK], Depends(get_batcher)]
PreprocessorDep = Annotated[Preprocessor, Depends(get_preprocessor)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AdminDep = Depends(require_admin)
