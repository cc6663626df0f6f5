"""Health, readiness, metrics, OpenAPI, and the random-weights notice."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app

PNG = {"content-type": "image/png"}
REPO = Path(__file__).resolve().parents[2]


def test_healthz_and_readyz(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "tasks": None}
    assert client.get("/readyz").json() == {"status": "ready", "tasks": 3}


def test_not_ready_before_startup(make_settings) -> None:
    client = TestClient(create_app(make_settings()))  # no `with`: the lifespan never ran
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503


def test_metrics_cover_requests_batches_cache_and_queue(make_settings, png) -> None:
    with TestClient(create_app(make_settings(task_metrics=True))) as client:  # per-task series: opt-in
        client.post("/classify?task=alpha", content=png(0), headers=PNG)
        client.post("/classify?task=nope", content=png(0), headers=PNG)
        text = client.get("/metrics").text
    for needle in [
        'rlrr_requests_total{route="/classify",status="200",task="alpha"} 1.0',
        'rlrr_requests_total{route="/classify",status="404",task=""} 1.0',
        'rlrr_request_seconds_count{route="/classify"} 2.0',
        "rlrr_queue_wait_seconds_count 1.0",
        "rlrr_batch_size_count 1.0",
        'rlrr_images_total{task="alpha"} 1.0',
        'rlrr_batches_total{strategy="merged"} 1.0',
        'rlrr_inference_seconds_count{strategy="merged"} 1.0',
        "rlrr_merged_cache_hits_total",
        "rlrr_merged_cache_misses_total",
        "rlrr_merged_cache_evictions_total",
        "rlrr_merged_cache_bytes",
        "rlrr_adapters_loaded 3.0",
        "rlrr_queue_depth 0.0",
        'rlrr_backbone_info{device="cpu",dtype="float32"',
    ]:
        assert needle in text, needle


def test_openapi_and_docs(client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/classify", "/tasks", "/tasks/{name}", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "image/jpeg" in spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


def test_random_backbone_is_said_plainly(make_settings, caplog, png) -> None:
    settings = make_settings(checkpoint=None, pretrained=False)
    with caplog.at_level(logging.WARNING, logger="app"), TestClient(create_app(settings)) as client:
        body = client.get("/tasks").json()
        assert body["backbone"]["random_weights"] is True
        # the store's adapters were trained on another backbone: refused, with the reason
        assert {t["state"] for t in body["tasks"]} == {"skipped"}
        first = body["backbone"]["fingerprint"]
        assert 'random_weights="true"' in client.get("/metrics").text
    assert any("RANDOM weights" in r.getMessage() for r in caplog.records)
    with TestClient(create_app(make_settings(checkpoint=None, pretrained=False))) as again:
        # a seeded init: the same random backbone (and fingerprint) in every process
        assert again.get("/tasks").json()["backbone"]["fingerprint"] == first


def test_settings_from_env(monkeypatch) -> None:
    from app.settings import Settings

    monkeypatch.setenv("RLRR_CHECKPOINT", "")  # as docker compose passes an unset variable
    monkeypatch.setenv("RLRR_ADMIN_TOKEN", "")
    monkeypatch.setenv("RLRR_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("RLRR_STRATEGY", "unmerged")
    settings = Settings()
    assert settings.checkpoint is None and settings.admin_token is None
    assert settings.max_batch_size == 7 and settings.strategy == "unmerged"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"backbone": "test_vit", "pretrained": True, "checkpoint": None}, "RLRR_CHECKPOINT=FILE"),
        ({"backbone": "no_such_vit", "checkpoint": None}, "unknown timm model 'no_such_vit'"),
        ({"checkpoint": "/nonexistent/w.safetensors"}, "no such file"),
        # a typo in the pretrained tag: timm's own error is a RuntimeError deep in create_model
        ({"backbone": "vit_pico_patch4_32.cifar6", "checkpoint": None},
         "unknown pretrained tag 'cifar6' for 'vit_pico_patch4_32'; timm has: cifar5"),
        ({"backbone": "vit_base_patch16_224.augreg_in21", "checkpoint": None},
         "unknown pretrained tag 'augreg_in21' for 'vit_base_patch16_224'; timm has: "),
    ],
)
def test_python_m_app_says_why_the_backbone_cannot_be_had(make_settings, overrides, expected) -> None:
    # `python -m app` checks this before uvicorn starts, so the user reads one line, not a traceback.
    from app.__main__ import check_backbone

    reason = check_backbone(make_settings(**overrides))
    assert reason is not None and expected in reason


def test_python_m_app_finds_a_port_in_use_before_warm_up(make_settings, tmp_path) -> None:
    # The port is checked first: the process exits with one line in about a second, before any
    # backbone is built (which here would fail too, and say so instead, were it built first).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "RLRR_HOST": "127.0.0.1", "RLRR_PORT": str(port), "RLRR_STORE": str(tmp_path),
               "RLRR_BACKBONE": "no_such_vit", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "app"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is already in use" in lines[0], proc.stderr
    assert "RLRR_PORT" in lines[0] and "no_such_vit" not in proc.stderr


def test_python_m_app_accepts_a_loadable_backbone(make_settings) -> None:
    from app.__main__ import check_backbone

    assert check_backbone(make_settings()) is None
