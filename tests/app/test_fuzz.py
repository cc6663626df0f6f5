"""API fuzzing from the OpenAPI document (schemathesis): no 5xx, and every answer as declared.

Runs against `create_app` with a copy of the demo store and the embedded backbone, over real HTTP
(uvicorn on a free port), with a bounded number of examples per operation.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings

DEMO_STORE = Path(__file__).resolve().parents[2] / "demo" / "store"
TOKEN = "fuzz-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def _settings(store: Path) -> Settings:
    return Settings(store=store, device="cpu", admin_token=TOKEN, warmup=False, preprocess_workers=1,
                    body_timeout_s=5.0)


schema = schemathesis.openapi.from_dict(create_app(_settings(DEMO_STORE)).openapi())


@pytest.fixture(autouse=True)
def _ieee_floats() -> Iterator[None]:
    # conftest flushes denormals on this thread (for torch); hypothesis refuses to draw floats then.
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, serving) -> Iterator[str]:  # noqa: ANN001
    store = Path(shutil.copytree(DEMO_STORE, tmp_path_factory.mktemp("fuzz") / "store"))  # DELETE may hit it
    with serving(create_app(_settings(store))) as port:
        yield f"http://127.0.0.1:{port}"


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@pytest.mark.parametrize("auth", [False, True], ids=["anonymous", "admin"])
def test_api_fuzz(case, base_url: str, auth: bool) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else None
    case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=30)
