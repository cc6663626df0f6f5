"""The embedded default (`make serve`): in-house hybrid backbone + the eight mini-VTAB adapters + `imagenet`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapters.backbones import HYBRID_NAME
from app.main import create_app
from app.settings import Settings
from trainer.mini_vtab import TASKS, prepare_task

ROOT = Path(__file__).resolve().parents[2]
DEMO_STORE = ROOT / "demo" / "store"
# 200 of digits' 797 test images: the binomial standard error of an accuracy near 0.8 is ~3 points;
# 10 points (> 3 SE) only fails when the served path and the trainer's evaluation really disagree.
SERVED_VS_RECORDED_TOL = 10.0
N_IMAGES = 200


@pytest.fixture(scope="module")
def demo_client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    store = shutil.copytree(DEMO_STORE, tmp_path_factory.mktemp("demo") / "store")  # never write the repo
    # Package defaults otherwise: the backbone name, pretrained=True (the embedded file), no network.
    with TestClient(create_app(Settings(store=store, device="cpu", admin_token=None))) as client:
        yield client


def test_defaults_serve_the_in_house_backbone_and_nine_tasks(demo_client: TestClient) -> None:
    body = demo_client.get("/tasks").json()
    assert body["backbone"]["name"] == HYBRID_NAME
    assert body["backbone"]["random_weights"] is False
    tasks = {t["name"]: t for t in body["tasks"]}
    assert set(tasks) == set(TASKS) | {"imagenet"}
    assert len(tasks["imagenet"]["labels"]) == 1000 and tasks["imagenet"]["labels"][309] == "bee"
    assert all(t["state"] == "loaded" for t in tasks.values()), tasks


def test_served_accuracy_matches_the_recorded_test_accuracy(demo_client: TestClient, tmp_path: Path) -> None:
    prepare_task("digits", tmp_path)  # scikit-learn's digits, rebuilt from the same seed (about a second)
    test = sorted((tmp_path / "digits" / "test").rglob("*.png"))
    sample = random.Random(0).sample(test, N_IMAGES)
    correct = 0
    for i in range(0, N_IMAGES, 16):  # max_images per request is 16 by default
        chunk = sample[i:i + 16]
        files = [("file", (p.name, p.read_bytes(), "image/png")) for p in chunk]
        response = demo_client.post("/classify?task=digits&top_k=1", files=files)
        assert response.status_code == 200, response.text
        for p, result in zip(chunk, response.json()["results"], strict=True):
            correct += result["predictions"][0]["label"] == p.parent.name
    served = 100.0 * correct / N_IMAGES
    recorded = demo_client.get("/tasks/digits").json()["metrics"]["test_top1"]
    assert served > 10.0 * 3  # far above chance (10 classes)
    assert abs(served - recorded) < SERVED_VS_RECORDED_TOL, (served, recorded)


def test_demo_adapters_name_no_path_of_the_machine_that_trained_them() -> None:
    # A shipped store holds no run folders (metadata["training"]): `trainer report` on a clone must
    # say the adapter records none, not draw whatever sits at that path on another machine.
    def strings(node: object) -> list[str]:
        if isinstance(node, str):
            return [node]
        values = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        return [s for v in values for s in strings(v)]

    for config in sorted(DEMO_STORE.glob("*/adapter_config.json")):
        metadata = json.loads(config.read_text())["metadata"]
        assert "training" not in metadata, config.parent.name
        assert not [s for s in strings(metadata) if s.startswith("/")], config.parent.name
