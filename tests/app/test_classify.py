"""POST /classify: served answers equal each task's merged model computed directly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from adapters import backbone_fingerprint
from app.main import create_app


def _post_png(client: TestClient, task: str, image: bytes, top_k: int = 10):  # noqa: ANN202
    return client.post(f"/classify?task={task}&top_k={top_k}", content=image, headers={"content-type": "image/png"})


@pytest.mark.parametrize("strategy", ["auto", "merged", "unmerged"])
def test_predictions_equal_merged_model(make_settings, refs, png, scores, strategy) -> None:
    with TestClient(create_app(make_settings(strategy=strategy))) as client:
        for task, ref in refs.items():
            image = png(hash(task) % 1000)
            response = _post_png(client, task, image)
            assert response.status_code == 200, response.text
            body = response.json()
            expected = ref.probs(image)
            got = scores(body["results"][0])
            assert len(got) == len(ref.labels)
            for i, label in enumerate(ref.labels):
                assert got[label] == pytest.approx(expected[i].item(), abs=1e-5)
            best = [p["index"] for p in body["results"][0]["predictions"]]
            assert best == expected.argsort(descending=True).tolist()
            assert body["task"] == task
            assert body["adapter_version"]


def test_response_fields_and_top_k(client, png) -> None:
    body = client.post("/classify?task=gamma&top_k=2", content=png(1), headers={"content-type": "image/png"}).json()
    assert set(body) == {"task", "adapter_version", "backbone_fingerprint", "time_ms", "results"}
    preds = body["results"][0]["predictions"]
    assert len(preds) == 2 and preds[0]["score"] >= preds[1]["score"]
    assert preds[0]["label"] == f"gamma-class-{preds[0]['index']}"
    # top_k beyond the task's classes returns every class once
    many = client.post("/classify?task=beta&top_k=50", content=png(1), headers={"content-type": "image/png"}).json()
    assert len(many["results"][0]["predictions"]) == 3
    assert body["backbone_fingerprint"] == client.get("/tasks").json()["backbone"]["fingerprint"]


def test_default_top_k_is_five(client, png) -> None:
    body = client.post("/classify?task=gamma", content=png(2), headers={"content-type": "image/png"}).json()
    assert len(body["results"][0]["predictions"]) == 5


@pytest.mark.parametrize(
    "fmt,ctype", [("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("PNG", "application/octet-stream")]
)
def test_raw_formats(client, png, fmt, ctype) -> None:
    response = client.post("/classify?task=alpha", content=png(3, fmt=fmt), headers={"content-type": ctype})
    assert response.status_code == 200, response.text


def test_multipart_images_in_order(client, refs, png, scores) -> None:
    images = [png(10 + i, size=(120 + 10 * i, 90)) for i in range(4)]
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = client.post("/classify?task=alpha&top_k=5", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 4
    for image, result in zip(images, results, strict=True):
        expected = refs["alpha"].probs(image)
        got = scores(result)
        assert [got[label] for label in refs["alpha"].labels] == pytest.approx(expected.tolist(), abs=1e-5)


def test_concurrent_requests_over_tasks_match_single_answers(make_settings, png, scores) -> None:
    # A long max_wait lets concurrent requests of different tasks share batches (the mixed path).
    settings = make_settings(max_wait_ms=50.0, max_batch_size=16)
    tasks = ["alpha", "beta", "gamma"]
    jobs = [(tasks[i % 3], png(100 + i % 7)) for i in range(66)]
    with TestClient(create_app(settings)) as client:
        single = {}
        for task, image in jobs[:21]:  # every (task, image) pair, one at a time
            single[(task, image)] = scores(_post_png(client, task, image).json()["results"][0])
        with ThreadPoolExecutor(max_workers=22) as pool:
            responses = list(pool.map(lambda job: _post_png(client, *job), jobs))
        for (task, image), response in zip(jobs, responses, strict=True):
            assert response.status_code == 200, response.text
            assert response.json()["task"] == task
            got, want = scores(response.json()["results"][0]), single[(task, image)]
            assert got.keys() == want.keys()
            for label in want:
                assert got[label] == pytest.approx(want[label], abs=1e-5)
        metrics = client.get("/metrics").text
    assert "rlrr_images_total 87.0" in metrics  # 21 + 66, counted without a per-task label by default


def test_base_weights_never_modified(make_settings, png) -> None:
    app = create_app(make_settings(strategy="auto", max_wait_ms=20.0))
    with TestClient(app) as client:
        engine = app.state.service.engine
        before = {k: v.clone() for k, v in engine.backbone.state_dict().items()}
        fingerprint = backbone_fingerprint(engine.backbone)
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(lambda i: _post_png(client, ["alpha", "beta", "gamma"][i % 3], png(i)), range(12)))
        after = engine.backbone.state_dict()
        assert fingerprint == engine.fingerprint == backbone_fingerprint(engine.backbone)
        assert all(torch.equal(before[k], after[k]) for k in before)
