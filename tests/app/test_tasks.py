"""/tasks: listing, refused adapters, admin upload and delete without a restart."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import timm
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.main import create_app

AUTH = {"authorization": "Bearer s3cret"}
PNG = {"content-type": "image/png"}


def _files(directory: Path) -> dict[str, tuple[str, bytes]]:
    return {"config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes())}


def _snapshot(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_list_tasks(client) -> None:
    body = client.get("/tasks").json()
    assert body["backbone"]["name"] == "test_vit"
    assert body["backbone"]["random_weights"] is False
    assert body["backbone"]["input_size"] == [3, 160, 160]
    tasks = {t["name"]: t for t in body["tasks"]}
    assert set(tasks) == {"alpha", "beta", "gamma"}
    assert tasks["alpha"]["state"] == "loaded"
    assert tasks["alpha"]["num_classes"] == 5
    assert tasks["alpha"]["parameters"] > 0 and tasks["alpha"]["bytes"] == 4 * tasks["alpha"]["parameters"]
    assert tasks["gamma"]["metrics"] == {"top1": pytest.approx(0.7)}


def test_show_task(client) -> None:
    body = client.get("/tasks/beta").json()
    assert body["labels"] == ["beta-class-0", "beta-class-1", "beta-class-2"]
    assert body["config"]["residual"] is False  # the ssf preset
    assert body["data_config"]["input_size"] == [3, 160, 160]
    assert client.get("/tasks/nope").status_code == 404
    assert client.get("/tasks/Bad.Name").status_code == 422


def test_foreign_and_broken_adapters_are_skipped_with_reason(make_settings, store, make_upload) -> None:
    torch.manual_seed(99)  # another backbone: another fingerprint
    other = {k: v.clone() for k, v in timm.create_model("test_vit").state_dict().items()}
    foreign = make_upload(state=other)
    foreign.rename(store / "foreign")
    (store / "broken").mkdir()
    (store / "broken" / "adapter_config.json").write_text("{not json")
    (store / "Bad_Name").mkdir()
    with TestClient(create_app(make_settings())) as client:
        tasks = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
        assert tasks["foreign"]["state"] == "skipped" and "fingerprint" in tasks["foreign"]["reason"]
        assert tasks["broken"]["state"] == "skipped" and "JSON" in tasks["broken"]["reason"]
        assert tasks["Bad_Name"]["state"] == "skipped"
        assert tasks["alpha"]["state"] == "loaded"
        assert client.get("/tasks/foreign").json()["reason"] == tasks["foreign"]["reason"]
        assert client.post("/classify?task=foreign", content=b"x", headers=PNG).status_code == 404
        assert "rlrr_adapters_skipped 3.0" in client.get("/metrics").text


def test_upload_serves_new_task_without_restart(client, store, make_upload, png, scores) -> None:
    directory = make_upload(classes=4)
    response = client.put("/tasks/delta", files=_files(directory), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["labels"] == ["up-0", "up-1", "up-2", "up-3"]
    assert (store / "delta" / "adapter_model.safetensors").read_bytes() == (
        directory / "adapter_model.safetensors").read_bytes()
    answer = client.post("/classify?task=delta&top_k=4", content=png(5), headers=PNG)
    assert answer.status_code == 200
    assert set(scores(answer.json()["results"][0])) == {"up-0", "up-1", "up-2", "up-3"}
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_upload_replaces_existing_task(client, store, make_upload, png) -> None:
    old = client.post("/classify?task=alpha", content=png(5), headers=PNG).json()
    response = client.put("/tasks/alpha", files=_files(make_upload(classes=4, seed=3)), headers=AUTH)
    assert response.status_code == 200
    new = client.post("/classify?task=alpha", content=png(5), headers=PNG).json()
    assert new["adapter_version"] != old["adapter_version"]
    assert new["adapter_version"] == response.json()["version"]
    assert {p["label"] for p in new["results"][0]["predictions"]} == {"up-0", "up-1", "up-2", "up-3"}
    # the store now holds the new adapter: a restart serves it too
    assert json.loads((store / "alpha" / "adapter_config.json").read_text())["num_classes"] == 4


def test_in_flight_requests_survive_replace_and_delete(make_settings, make_upload, png) -> None:
    with TestClient(create_app(make_settings(max_wait_ms=20.0))) as client:
        files = _files(make_upload())

        def classify(i: int) -> int:
            task = "alpha" if i % 2 else "gamma"
            return client.post(f"/classify?task={task}", content=png(i), headers=PNG).status_code

        with ThreadPoolExecutor(max_workers=8) as pool:
            pending = [pool.submit(classify, i) for i in range(24)]
            assert client.put("/tasks/alpha", files=files, headers=AUTH).status_code == 200
            assert client.delete("/tasks/gamma", headers=AUTH).status_code == 204
            statuses = [f.result() for f in pending]
        # a request is either served (before or after the change) or finds gamma gone: never a 5xx
        assert set(statuses) <= {200, 404}
        assert all(s == 200 for i, s in enumerate(statuses) if i % 2)


@pytest.mark.parametrize("mutate,reason", [
    ("nan", "non-finite"),
    ("shape", "shape"),
    ("checksum", "checksum"),
    ("fingerprint", "fingerprint"),
    ("json", "JSON"),
    ("missing", "lacks"),
    ("input_size", "input_size"),
])
def test_bad_upload_is_422_and_store_unchanged(client, store, make_upload, tmp_path, mutate, reason) -> None:
    directory = make_upload()
    config = json.loads((directory / "adapter_config.json").read_text())
    weights_path = directory / "adapter_model.safetensors"
    if mutate in ("nan", "shape"):
        tensors = load_file(str(weights_path))
        key = "blocks.0.attn.qkv.rlrr_l"
        tensors[key] = tensors[key].clone().fill_(float("nan")) if mutate == "nan" else torch.zeros(5)
        save_file(tensors, str(weights_path))
        config["weights_sha256"] = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    elif mutate == "checksum":
        config["weights_sha256"] = "0" * 64
    elif mutate == "fingerprint":
        config["backbone_fingerprint"] = "f" * 64
    elif mutate == "input_size":
        config["data_config"]["input_size"] = [3, 224, 224]
    files = _files(directory)
    files["config"] = ("adapter_config.json", b"{oops" if mutate == "json" else json.dumps(config).encode())
    if mutate == "missing":
        del files["weights"]
    before = _snapshot(store)
    response = client.put("/tasks/alpha", files=files, headers=AUTH)
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"]
    assert _snapshot(store) == before
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []
    assert client.get("/tasks/alpha").json()["num_classes"] == 5


def test_admin_needs_token(client, make_upload) -> None:
    files = _files(make_upload())
    assert client.put("/tasks/delta", files=files).status_code == 401
    assert client.put("/tasks/delta", files=files, headers={"authorization": "Bearer wrong"}).status_code == 403
    assert client.put("/tasks/delta", files=files, headers={"authorization": "Basic s3cret"}).status_code == 401
    assert client.delete("/tasks/alpha").status_code == 401
    assert client.delete("/tasks/alpha", headers={"authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/tasks/alpha").status_code == 200


def test_admin_disabled_without_configured_token(make_settings, make_upload) -> None:
    with TestClient(create_app(make_settings(admin_token=None))) as client:
        response = client.put("/tasks/delta", files=_files(make_upload()), headers=AUTH)
        assert response.status_code == 403
        assert "disabled" in response.json()["detail"]
        assert client.delete("/tasks/alpha", headers=AUTH).status_code == 403


@pytest.mark.parametrize("name", ["Bad", "_x", ".x", "a%2F..%2Fb", "..", "x" * 65])
def test_admin_bad_names_never_touch_the_store(client, store, make_upload, name) -> None:
    before = _snapshot(store)
    response = client.put(f"/tasks/{name}", files=_files(make_upload()), headers=AUTH)
    assert response.status_code in (404, 405, 422)
    assert _snapshot(store) == before


def test_delete(client, store, png) -> None:
    assert client.delete("/tasks/beta", headers=AUTH).status_code == 204
    assert not (store / "beta").exists()
    assert client.post("/classify?task=beta", content=png(0), headers=PNG).status_code == 404
    assert client.delete("/tasks/beta", headers=AUTH).status_code == 404
    assert "beta" not in {t["name"] for t in client.get("/tasks").json()["tasks"]}
    assert client.post("/classify?task=alpha", content=png(0), headers=PNG).status_code == 200


def test_upload_over_byte_limit_is_413(make_settings, make_upload) -> None:
    with TestClient(create_app(make_settings(max_body_bytes=1000))) as client:
        assert client.put("/tasks/delta", files=_files(make_upload()), headers=AUTH).status_code == 413


def test_upload_needs_multipart(client) -> None:
    response = client.put("/tasks/delta", content=b"{}", headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 415
