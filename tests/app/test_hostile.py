"""Findings of a hostile black-box test (issue 12): each test failed before its fix."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import re
import shutil
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app import preprocess
from app import registry as registry_module
from app import service as service_module
from app.batcher import Batcher
from app.engine import Engine
from app.main import create_app

AUTH = {"authorization": "Bearer s3cret"}
PNG = {"content-type": "image/png"}


def _files(directory: Path, **edits: object) -> dict[str, tuple[str, bytes]]:
    config = json.loads((directory / "adapter_config.json").read_text())
    for key, value in edits.items():
        target = config
        *parents, leaf = key.split("__")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return {"config": ("adapter_config.json", json.dumps(config).encode()),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes())}


def _snapshot(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


# -- 1: a config that fails validation is a 422 and leaves nothing behind ---------------------------

BAD_CONFIGS = {
    "integer_labels": ({"labels": [1, 2, 3, 4]}, "labels.0"),
    "metadata_not_object": ({"metadata": "nope"}, "metadata"),
    "base_model_list": ({"base_model": ["x"]}, "base_model"),
    "num_classes_bool": ({"num_classes": True}, "num_classes"),
    "interpolation_nope": ({"data_config__interpolation": "nope"}, "interpolation"),
    "mean_nope": ({"data_config__mean": "nope"}, "mean"),
    "crop_pct_tiny": ({"data_config__crop_pct": 1e-6}, "crop_pct"),
    "rlrr_config_string": ({"rlrr_config": "nope"}, "rlrr_config"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_put_invalid_config_is_422_and_stores_nothing(client, store, make_upload, case) -> None:
    edits, field = BAD_CONFIGS[case]
    before = _snapshot(store)
    response = client.put("/tasks/delta", files=_files(make_upload(), **edits), headers=AUTH)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert _snapshot(store) == before
    assert client.get("/tasks/delta").status_code == 404
    assert client.get("/tasks").status_code == 200


def test_put_integer_labels_is_422_and_stores_nothing(client, store, make_upload) -> None:
    response = client.put("/tasks/delta", files=_files(make_upload(), labels=[1, 2, 3, 4]), headers=AUTH)
    assert response.status_code == 422
    assert "labels" in response.json()["detail"]
    assert not (store / "delta").exists()
    assert client.get("/tasks/delta").status_code == 404
    assert client.post("/classify?task=delta", content=b"x", headers=PNG).status_code == 404


def test_stored_integer_labels_are_skipped_at_startup(make_settings, store) -> None:
    config = json.loads((store / "beta" / "adapter_config.json").read_text())
    config["labels"] = [0, 1, 2]
    (store / "beta" / "adapter_config.json").write_text(json.dumps(config))
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/tasks").status_code == 200
        detail = client.get("/tasks/beta").json()
        assert detail["state"] == "skipped" and "labels" in detail["reason"]
        assert client.post("/classify?task=beta", content=b"x", headers=PNG).status_code == 404


def test_out_of_memory_on_load_is_503_not_422(client, store, make_upload, monkeypatch) -> None:
    async def oom(self, task):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Engine, "prepare", oom)
    before = _snapshot(store)
    response = client.put("/tasks/delta", files=_files(make_upload()), headers=AUTH)
    assert response.status_code == 503, response.text
    assert "memory" in response.json()["detail"]
    assert _snapshot(store) == before


def test_engine_bug_on_load_is_500_and_stores_nothing(make_settings, store, make_upload, monkeypatch) -> None:
    async def bug(self, task):
        raise RuntimeError("engine bug")

    with TestClient(create_app(make_settings()), raise_server_exceptions=False) as client:
        monkeypatch.setattr(Engine, "prepare", bug)
        before = _snapshot(store)
        response = client.put("/tasks/delta", files=_files(make_upload()), headers=AUTH)
        assert response.status_code == 500
        assert response.json() == {"detail": "internal error"}
        assert _snapshot(store) == before


# -- 2, 3: an unexpected error is a JSON 500 on a connection that stays usable, and is counted -----

def _broken_backbone_info(*args):
    raise RuntimeError("provoked bug")


def test_500_keeps_the_keep_alive_connection_usable(make_settings, monkeypatch, serving) -> None:
    monkeypatch.setattr(service_module, "backbone_info", _broken_backbone_info)
    with serving(create_app(make_settings(warmup=False))) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/tasks")
        response = conn.getresponse()
        assert response.status == 500
        assert json.loads(response.read()) == {"detail": "internal error"}
        local = conn.sock.getsockname()
        for _ in range(3):  # the same socket serves the next requests
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["status"] == "ok"
            assert conn.sock.getsockname() == local
        conn.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert [client.get(p).status_code for p in ("/tasks", "/healthz", "/tasks", "/readyz")] == [
                500, 200, 500, 200]


def test_500_is_counted_in_requests_total(make_settings, monkeypatch) -> None:
    monkeypatch.setattr(service_module, "backbone_info", _broken_backbone_info)
    with TestClient(create_app(make_settings(warmup=False)), raise_server_exceptions=False) as client:
        assert client.get("/tasks").status_code == 500
        metrics = client.get("/metrics").text
        assert 'rlrr_requests_total{route="/tasks",status="500"} 1.0' in metrics  # no task label by default


# -- 5, 9, 10: decoding is bounded, says its own limit, and turns images upright --------------------

def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def _sizes_seen(data: bytes, min_side: int) -> tuple[int, int]:
    seen: list[tuple[int, int]] = []
    preprocess.decode(data, lambda im: seen.append(im.size) or torch.zeros(1), 200_000_000, min_side)
    return seen[0]


def test_large_jpeg_is_decoded_in_draft_mode(client) -> None:
    data = _encoded(Image.new("RGB", (4000, 3000), (200, 30, 30)), "JPEG")
    assert _sizes_seen(data, min_side=178) == (500, 375)  # DCT-scaled 1/8 on load, still >= 178 a side
    assert client.post("/classify?task=alpha", content=data, headers={"content-type": "image/jpeg"}).status_code == 200


def test_large_png_is_reduced_before_the_transform() -> None:
    data = _encoded(Image.new("RGB", (2000, 1800)), "PNG")
    width, height = _sizes_seen(data, min_side=178)
    assert min(width, height) >= 2 * 178 and width * height < 2000 * 1800 / 16


def test_request_pixel_budget_is_413_with_reason(make_settings, png) -> None:
    with TestClient(create_app(make_settings(max_request_pixels=2 * 200 * 180))) as client:
        files = [("file", (f"{i}.png", png(i), "image/png")) for i in range(3)]
        response = client.post("/classify?task=alpha", files=files)
        assert response.status_code == 413
        assert "108000 pixels" in response.json()["detail"] and "72000" in response.json()["detail"]
        assert client.post("/classify?task=alpha", files=files[:2]).status_code == 200


def test_memory_is_given_back_after_a_large_decode(client, png, monkeypatch) -> None:
    trims: list[bool] = []
    monkeypatch.setattr(preprocess, "trim_heap", lambda: trims.append(True))
    monkeypatch.setattr(preprocess, "TRIM_ABOVE_PIXELS", 200 * 180 - 1)
    assert client.post("/classify?task=alpha", content=png(0, size=(100, 100)), headers=PNG).status_code == 200
    assert trims == []
    assert client.post("/classify?task=alpha", content=png(0), headers=PNG).status_code == 200
    assert trims == [True]


def test_image_over_pillow_bomb_limit_names_the_configured_limit(client) -> None:
    # 14000 x 13000 = 182 Mpx: over twice Pillow's own limit, so Image.open itself refuses it.
    data = _encoded(Image.new("1", (14000, 13000)), "PNG")
    response = client.post("/classify?task=alpha", content=data, headers=PNG)
    assert response.status_code == 413
    assert "40000000" in response.json()["detail"] and "DOS" not in response.json()["detail"]


def test_exif_orientation_is_applied_before_preprocessing() -> None:
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 90 degrees counter-clockwise: displayed rotated clockwise
    data = _encoded(image, "JPEG", exif=exif.tobytes(), quality=95)
    upright = preprocess.decode(data, lambda im: torch.from_numpy(np.array(im)), 1_000_000)
    assert tuple(upright.shape) == (40, 20, 3)
    assert upright[5, 10, 0] > 200 and upright[35, 10, 0] < 50  # red on top once upright


# -- 6: load shedding comes before any work; a request that can never fit is not a 503 -------------

def test_request_over_queue_size_is_413_not_503_even_when_idle(make_settings, png) -> None:
    with TestClient(create_app(make_settings(queue_size=8))) as client:
        files = [("file", (f"{i}.png", png(i, size=(40, 40)), "image/png")) for i in range(9)]
        response = client.post("/classify?task=alpha", files=files)
        assert response.status_code == 413
        assert "retry-after" not in response.headers
        assert "at most 8" in response.json()["detail"]
        assert client.post("/classify?task=alpha", files=files[:8]).status_code == 200


def test_full_queue_is_503_before_decoding(client, png, monkeypatch) -> None:
    decoded: list[object] = []
    monkeypatch.setattr(preprocess, "open_image", lambda *args: decoded.append(args))
    monkeypatch.setattr(Batcher, "depth", property(lambda self: self.max_queue))
    response = client.post("/classify?task=alpha", content=png(0), headers=PNG)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert decoded == []


# -- 7: a stalled body gets 408 and a closed connection; an aborted one logs one warning -------------

def _raw_request(port: int, head: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("method,path", [("POST", "/classify?task=alpha"), ("PUT", "/tasks/delta")])
def test_stalled_body_is_408_and_the_connection_closed(make_settings, method, path, serving) -> None:
    kind = "image/png" if method == "POST" else "multipart/form-data; boundary=xyz"
    with serving(create_app(make_settings(warmup=False, body_timeout_s=0.5))) as port:
        start = time.monotonic()
        sock = _raw_request(port, f"{method} {path} HTTP/1.1\nHost: x\nAuthorization: Bearer s3cret\n"
                                  f"Content-Type: {kind}\nContent-Length: 1000\n", b"0123456789")
        answer = _read_all(sock)  # returns once the server closes the connection
        sock.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"connection: close" in answer.lower()
        assert b"not received within 0.5 s (10 bytes arrived)" in answer
        assert time.monotonic() - start < 5


def test_aborted_upload_logs_one_warning_without_traceback(make_settings, caplog, serving) -> None:
    with serving(create_app(make_settings(warmup=False))) as port:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            sock = _raw_request(port, "PUT /tasks/delta HTTP/1.1\nHost: x\nAuthorization: Bearer s3cret\n"
                                      "Content-Type: multipart/form-data; boundary=xyz\nContent-Length: 100000\n",
                                b"--xyz\r\n" + b"x" * 1000)
            time.sleep(0.3)
            sock.close()
            deadline = time.monotonic() + 5
            while not [r for r in caplog.records if r.levelno >= logging.WARNING]:
                assert time.monotonic() < deadline, "nothing logged about the aborted upload"
                time.sleep(0.05)
            time.sleep(0.3)
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1, [r.getMessage() for r in problems]
    assert problems[0].levelno == logging.WARNING and problems[0].exc_info is None
    assert "disconnected" in problems[0].getMessage() and "PUT /tasks/delta" in problems[0].getMessage()


# -- 8: no server path in any answer -----------------------------------------------------------------

def test_refusal_reasons_name_no_server_paths(make_settings, store, make_upload) -> None:
    (store / "broken").mkdir()
    (store / "broken" / "adapter_config.json").write_text("{not json")
    shutil.copytree(store / "alpha", store / "noweights")
    (store / "noweights" / "adapter_model.safetensors").unlink()
    shutil.copytree(store / "alpha", store / "nofields")
    (store / "nofields" / "adapter_config.json").write_text("{}")
    junk = b"\x00" * 64
    upload = _files(make_upload(), weights_sha256=hashlib.sha256(junk).hexdigest())
    upload["weights"] = ("adapter_model.safetensors", junk)
    with TestClient(create_app(make_settings())) as client:
        listing = client.get("/tasks").text
        put = client.put("/tasks/delta", files=upload, headers=AUTH)
        assert put.status_code == 422
        reasons = {t["name"]: t["reason"] for t in client.get("/tasks").json()["tasks"] if t["state"] == "skipped"}
    assert set(reasons) == {"broken", "noweights", "nofields"}
    for text in (listing, put.text, *reasons.values()):
        assert str(store) not in text and str(store.parent) not in text and ".upload-" not in text, text
    assert "adapter_model.safetensors is missing" in reasons["noweights"]
    assert "delta" in put.json()["detail"]


# -- 9: no bare or empty reasons ---------------------------------------------------------------------

@pytest.mark.parametrize("error,expected", [(KeyError("nope"), "missing or unknown key 'nope'"),
                                            (ValueError(), "ValueError while reading it")])
def test_bare_and_empty_errors_get_a_reason(client, make_upload, monkeypatch, error, expected) -> None:
    def fail(config):
        raise error

    monkeypatch.setattr(registry_module, "make_transform", fail)
    client.app.state.service.registry._transforms.clear()  # transforms are built once per data config: build again
    response = client.put("/tasks/delta", files=_files(make_upload()), headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"] == f"adapter 'delta' refused: {expected}"


@pytest.mark.parametrize("edits,expected", [({"data_config__interpolation": "nope"}, "interpolation"),
                                            ({"data_config__mean": "nope"}, "mean")])
def test_config_values_timm_rejects_are_named(client, make_upload, edits, expected) -> None:
    detail = client.put("/tasks/delta", files=_files(make_upload(), **edits), headers=AUTH).json()["detail"]
    assert not detail.endswith(("refused: ", "refused: 'nope'"))
    assert f"data_config.{expected}" in detail


# -- 11: base_model must name the served backbone ----------------------------------------------------

def test_upload_for_another_base_model_is_refused_with_reason(client, store, make_upload) -> None:
    before = _snapshot(store)
    response = client.put("/tasks/delta", files=_files(make_upload(), base_model="vit_base_patch16_224"),
                          headers=AUTH)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "base_model 'vit_base_patch16_224'" in detail and "'test_vit'" in detail
    assert _snapshot(store) == before
    tagged = client.put("/tasks/delta", files=_files(make_upload(), base_model="test_vit.r160_in1k"), headers=AUTH)
    assert tagged.status_code == 200  # the same model, named with its pretrained tag


# -- 12: leftovers of a crash are removed at start-up; symlinked tasks leave no trash ----------------

def test_startup_removes_leftover_upload_folders(make_settings, store, caplog) -> None:
    for leftover in (".upload-delta-k2j4", ".alpha.old-123-4", ".beta.deleted-5-6"):
        (store / leftover).mkdir()
        (store / leftover / "adapter_model.safetensors").write_bytes(b"partial")
    (store / ".keep").mkdir()  # not ours: stays
    with caplog.at_level(logging.WARNING, logger="app"), TestClient(create_app(make_settings())) as client:
        assert {t["name"] for t in client.get("/tasks").json()["tasks"]} == {"alpha", "beta", "gamma"}
    assert sorted(p.name for p in store.iterdir() if p.name.startswith(".")) == [".keep"]
    removed = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert len(removed) == 3 and any(".upload-delta-k2j4" in m for m in removed)


def test_deleting_or_replacing_a_symlinked_task_leaves_no_link_behind(make_settings, store, tmp_path,
                                                                       make_upload) -> None:
    for name in ("alpha", "beta"):
        shutil.move(store / name, tmp_path / f"outside-{name}")
        (store / name).symlink_to(tmp_path / f"outside-{name}", target_is_directory=True)
    with TestClient(create_app(make_settings())) as linked:
        assert linked.get("/tasks/alpha").json()["state"] == "loaded"
        assert linked.delete("/tasks/alpha", headers=AUTH).status_code == 204
        assert linked.put("/tasks/beta", files=_files(make_upload()), headers=AUTH).status_code == 200
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []
    assert not (store / "alpha").exists() and not (store / "beta").is_symlink()
    assert (tmp_path / "outside-alpha" / "adapter_config.json").is_file()  # the link's target is not ours


# -- 13: the OpenAPI document says what the server does; /docs works offline ------------------------

def test_openapi_declares_statuses_and_the_bearer_scheme(client) -> None:
    spec = client.get("/openapi.json").json()
    put = spec["paths"]["/tasks/{name}"]["put"]
    assert {"200", "401", "403", "413", "415", "422", "500"} <= set(put["responses"])
    assert put["security"] == [{"admin": []}] and "security" not in spec["paths"]["/tasks/{name}"]["get"]
    assert spec["components"]["securitySchemes"]["admin"] == {"type": "http", "scheme": "bearer",
                                                               "description": "RLRR_ADMIN_TOKEN"}
    assert {"400", "404", "413", "415", "422", "503"} <= set(spec["paths"]["/classify"]["post"]["responses"])
    error = spec["components"]["schemas"]["ErrorResponse"]
    assert error["properties"]["detail"]["type"] == "string"
    assert put["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.mark.parametrize("path", ["/tasks/Bad_Name", "/classify?task=alpha&top_k=0"])
def test_every_422_sends_detail_as_a_string(client, path) -> None:
    response = client.put(path, headers=AUTH) if path.startswith("/tasks") else client.post(path, headers=PNG)
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str) and response.json()["errors"]


def test_405_lists_every_allowed_method(client) -> None:
    response = client.post("/tasks/alpha")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD, PUT, DELETE"  # HEAD wherever GET (app.main.HeadAsGet)
    assert client.get("/classify").headers["allow"] == "POST"


def test_trailing_slash_is_not_redirected_to_the_clients_host(client) -> None:
    response = client.get("/tasks/", headers={"host": "evil.example"}, follow_redirects=False)
    assert response.status_code == 404 and "location" not in response.headers


def test_docs_load_without_a_cdn(client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        assert "http://" not in html and "https://" not in html, html
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets
        for asset in assets:
            response = client.get(f"/{asset}")
            assert response.status_code == 200 and len(response.content) > 1000, asset


def test_task_detail_shows_no_absolute_paths_from_metadata(make_settings, store) -> None:
    config = json.loads((store / "beta" / "adapter_config.json").read_text())
    config["metadata"]["backbone"] = {"checkpoint": "/srv/secret/weights/vit.safetensors", "name": "test_vit"}
    (store / "beta" / "adapter_config.json").write_text(json.dumps(config))
    with TestClient(create_app(make_settings())) as client:
        detail = client.get("/tasks/beta")
    assert "/srv/secret" not in detail.text
    assert detail.json()["metadata"]["backbone"] == {"checkpoint": "vit.safetensors", "name": "test_vit"}
