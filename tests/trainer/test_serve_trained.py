"""Trainer → server: an adapter trained at a non-default --img-size is served by a server built from the same spec.

Both sides build the backbone with `adapters.build_backbone` from one `BackboneSpec`; the trainer
records it in adapter_config.json, the server is told its kwargs (RLRR_BACKBONE_KWARGS).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from adapters import load_adapter
from app.main import create_app
from app.settings import Settings
from trainer.cli import main


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory, vit_checkpoint: Path) -> Path:
    # test_vit's default resolution is 160; trained at 32 through the CLI, as a user would.
    root = tmp_path_factory.mktemp("serve-trained")
    data = root / "data"
    for split, n in (("train", 6), ("test", 2)):
        for cls, color in (("blue", (20, 40, 230)), ("red", (230, 30, 20))):
            for i in range(n):
                path = data / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (40, 40), tuple(min(255, c + 9 * i) for c in color)).save(path)
    code = main(["--task", "colours", "--data-root", str(data), "--backbone", "test_vit",
                 "--checkpoint", str(vit_checkpoint), "--img-size", "32", "--epochs", "2", "--batch-size", "4",
                 "--warmup-epochs", "0", "--workers", "0", "--store", str(root / "store"),
                 "--run-dir", str(root / "run")])
    assert code == 0
    return root / "store"


def _settings(store: Path, checkpoint: Path, **overrides: object) -> Settings:
    values = dict(backbone="test_vit", checkpoint=checkpoint, store=store, device="cpu", max_wait_ms=2.0,
                  preprocess_workers=1)
    return Settings(**{**values, **overrides})  # type: ignore[arg-type]


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (50, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def test_adapter_trained_at_img_size_32_is_served(trained_store: Path, vit_checkpoint: Path) -> None:
    settings = _settings(trained_store, vit_checkpoint, backbone_kwargs={"img_size": 32})
    with TestClient(create_app(settings)) as client:
        r = client.post("/classify?task=colours&top_k=2", content=_png((230, 30, 20)),
                        headers={"content-type": "image/png"})
        assert r.status_code == 200, (r.text, client.get("/tasks").json()["tasks"])
        labels = {p["label"] for p in r.json()["results"][0]["predictions"]}
        assert labels == {"blue", "red"}
        listing = client.get("/tasks").json()
    adapter = load_adapter(trained_store / "colours")
    assert listing["backbone"]["input_size"] == [3, 32, 32]
    assert listing["backbone"]["model_kwargs"] == {"img_size": 32}
    assert listing["backbone"]["fingerprint"] == adapter.fingerprint  # one loader: the same weights
    assert [(t["name"], t["state"]) for t in listing["tasks"]] == [("colours", "loaded")]
    assert adapter.backbone_spec.model_kwargs == {"img_size": 32}


def test_server_with_other_kwargs_refuses_it_naming_both(trained_store: Path, vit_checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLRR_BACKBONE_KWARGS", "")  # docker compose's unset variable: no kwargs
    settings = _settings(trained_store, vit_checkpoint)
    assert settings.backbone_kwargs == {}
    with TestClient(create_app(settings)) as client:
        [task] = client.get("/tasks").json()["tasks"]
        assert task["state"] == "skipped"
        assert 'model_kwargs {"img_size": 32}' in task["reason"] and "model_kwargs {}" in task["reason"]
        r = client.post("/classify?task=colours", content=_png((20, 40, 230)), headers={"content-type": "image/png"})
        assert r.status_code == 404


def test_backbone_kwargs_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLRR_BACKBONE", "vit_pico_patch4_32.cifar5")
    monkeypatch.setenv("RLRR_BACKBONE_KWARGS", json.dumps({"img_size": 32}))
    assert Settings().backbone_spec().model_kwargs == {}  # the pico backbone is 32 px already: no kwarg
    monkeypatch.setenv("RLRR_BACKBONE", "test_vit")
    assert Settings().backbone_spec().model_kwargs == {"img_size": 32}
    monkeypatch.setenv("RLRR_BACKBONE_KWARGS", "{img_size: 32}")
    with pytest.raises(ValueError, match="not a JSON object"):
        Settings()
