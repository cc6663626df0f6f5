"""A real `python -m app` (uvicorn) process on a loopback port, driven with httpx."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PNG = {"content-type": "image/png"}


@pytest.fixture
def server(store: Path, checkpoint: Path, tmp_path: Path, start_server) -> Iterator[tuple[str, Path]]:
    env = {"RLRR_BACKBONE": "test_vit", "RLRR_CHECKPOINT": str(checkpoint), "RLRR_STORE": str(store),
           "RLRR_DEVICE": "cpu", "RLRR_ADMIN_TOKEN": "s3cret", "RLRR_MAX_WAIT_MS": "20",
           "RLRR_TASK_METRICS": "true", "RLRR_PINNED_TASKS": "beta,gamma"}
    log = tmp_path / "server.log"
    with start_server(env, log) as url:
        yield url, log


def test_real_server_end_to_end(server, refs, png, scores) -> None:
    url, log = server
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        assert {t["name"] for t in client.get("/tasks").json()["tasks"]} == {"alpha", "beta", "gamma"}
        body = client.post("/classify?task=gamma&top_k=7", content=png(1), headers=PNG).json()
        expected = refs["gamma"].probs(png(1))
        got = scores(body["results"][0])
        assert [got[label] for label in refs["gamma"].labels] == pytest.approx(expected.tolist(), abs=1e-5)
        assert client.post("/classify?task=nope", content=png(1), headers=PNG).status_code == 404

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            jobs = [client.post(f"/classify?task={['alpha', 'beta', 'gamma'][i % 3]}&top_k=10",
                                content=png(i % 5), headers=PNG) for i in range(30)]
            return await asyncio.gather(*jobs)

    for i, response in enumerate(asyncio.run(burst())):
        task = ["alpha", "beta", "gamma"][i % 3]
        assert response.status_code == 200
        expected = refs[task].probs(png(i % 5))
        got = scores(response.json()["results"][0])
        assert [got[label] for label in refs[task].labels] == pytest.approx(expected.tolist(), abs=1e-5)

    metrics = httpx.get(f"{url}/metrics").text
    assert 'rlrr_requests_total{route="/classify",status="200",task="alpha"}' in metrics  # RLRR_TASK_METRICS
    assert "rlrr_tasks_pinned 2.0" in metrics  # RLRR_PINNED_TASKS, comma-separated
    assert "ready" in log.read_text()
