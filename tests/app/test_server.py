"""A real `python -m app` (uvicorn) process on a loopback port, driven with httpx."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

PNG = {"content-type": "image/png"}
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(store: Path, checkpoint: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = _free_port()
    env = {**os.environ, "RLRR_BACKBONE": "test_vit", "RLRR_CHECKPOINT": str(checkpoint), "RLRR_STORE": str(store),
           "RLRR_DEVICE": "cpu", "RLRR_HOST": "127.0.0.1", "RLRR_PORT": str(port), "RLRR_ADMIN_TOKEN": "s3cret",
           "RLRR_MAX_WAIT_MS": "20", "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # a start-up bound, not a performance assertion
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server never became ready:\n{log.read_text()}")
            time.sleep(0.2)
        yield url, log
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    assert 'rlrr_requests_total{route="/classify",status="200",task="alpha"}' in metrics
    assert "ready" in log.read_text()
