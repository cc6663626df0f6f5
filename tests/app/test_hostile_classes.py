"""Hostile input, round three (issue 21): each test guards a class of input, not one example, and
failed before its fix."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save
from timm.data import create_transform

import app.__main__ as app_main
from adapters import AdapterError, BackboneSpec, RLRRConfig, add_rlrr, build_backbone, save_adapter
from app import preprocess
from app.batcher import Batcher
from app.engine import Engine, _top_k
from app.errors import AdapterFailure
from app.main import create_app
from app.payloads import parse_count
from app.settings import Settings
from app.tasks import BatchItem

AUTH = {"authorization": "Bearer s3cret"}
PNG = {"content-type": "image/png"}
REPO = Path(__file__).resolve().parents[2]


def _snapshot(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _config_upload(directory: Path, config: dict | bytes) -> dict[str, tuple[str, bytes]]:
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()  # json escapes lone surrogates
    return {"config": ("adapter_config.json", raw),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes())}


def _config(directory: Path) -> dict:
    return json.loads((directory / "adapter_config.json").read_text())


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


# -- strings the server stores or echoes: refused unless encodable ----------------------------------

def _set(config: dict, where: str, value: object) -> dict:
    *parents, leaf = where.split(".")
    target = config
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = value
    return config


UNENCODABLE = {  # where -> value: each holds a lone surrogate (valid in a Python str, not in Unicode)
    "label_high_surrogate": ("labels", ["\ud800", "b", "c", "d"]),
    "label_low_surrogate_inside": ("labels", ["a", "b\udfffb", "c", "d"]),
    "metadata_value": ("metadata.note", "ok \ud83d"),
    "metadata_key": ("metadata.nested", {"\udc80key": 1}),
    "metadata_deep_list": ("metadata.runs", [[{"name": "\udbff"}]]),
    "base_model": ("base_model", "test_vit\ud800"),
}


@pytest.mark.parametrize("case", sorted(UNENCODABLE))
def test_config_text_that_is_not_unicode_is_refused_and_stores_nothing(client, store, make_upload, case) -> None:
    where, value = UNENCODABLE[case]
    upload = make_upload()
    before = _snapshot(store)
    response = client.put("/tasks/delta", files=_config_upload(upload, _set(_config(upload), where, value)),
                          headers=AUTH)
    assert response.status_code == 422, response.text
    assert "not valid Unicode" in response.json()["detail"]
    assert _snapshot(store) == before
    assert client.get("/tasks").status_code == 200 and client.get("/").status_code == 200
    assert client.get("/tasks/delta").status_code == 404


@pytest.mark.parametrize("raw", [b'{"x": NaN}', b'{"x": -Infinity}', b'{"x": Infinity}'])
def test_config_numbers_json_cannot_carry_are_refused(client, store, make_upload, raw) -> None:
    upload = make_upload()
    text = json.dumps(_config(upload)).replace('"metadata": {}', f'"metadata": {raw.decode()}')
    assert raw.decode() in text
    response = client.put("/tasks/delta", files=_config_upload(upload, text.encode()), headers=AUTH)
    assert response.status_code == 422 and "not a JSON number" in response.json()["detail"]
    assert client.get("/tasks").status_code == 200


def test_stored_config_that_is_not_unicode_is_skipped_at_startup(make_settings, store) -> None:
    config = _config(store / "beta")
    config["labels"][1] = "\ud800"
    (store / "beta" / "adapter_config.json").write_text(json.dumps(config))
    with TestClient(create_app(make_settings())) as client:
        listing = client.get("/tasks")
        assert listing.status_code == 200
        beta = next(t for t in listing.json()["tasks"] if t["name"] == "beta")
        assert beta["state"] == "skipped" and "labels[1] is not valid Unicode" in beta["reason"]
        assert client.get("/").status_code == 200
        assert client.post("/classify?task=alpha", content=_encoded(Image.new("RGB", (64, 64)), "PNG"),
                           headers=PNG).status_code == 200


def test_store_folder_whose_name_is_not_utf8_is_listed_and_explained(make_settings, store) -> None:
    os.mkdir(os.path.join(os.fsencode(store), b"bad\xff-name"))
    with TestClient(create_app(make_settings())) as client:
        listing = client.get("/tasks")
        assert listing.status_code == 200, listing.text
        skipped = {t["name"]: t["reason"] for t in listing.json()["tasks"] if t["state"] == "skipped"}
    assert set(skipped) == {"bad\\xff-name"}
    assert "rename" in skipped["bad\\xff-name"]


# -- decode work: budgeted on what the resize makes, before any decode -------------------------------

EXTREME = {  # name -> (format, width, height): each resizes to billions of pixels before the crop
    "png_1x250000": ("PNG", 1, 250_000),
    "png_250000x1": ("PNG", 250_000, 1),
    "png_2x120000": ("PNG", 2, 120_000),
    "webp_1x16383": ("WEBP", 1, 16_383),
    "jpeg_8x65000": ("JPEG", 8, 65_000),
}


@pytest.mark.parametrize("case", sorted(EXTREME))
def test_image_whose_resize_is_over_the_pixel_limit_is_413_before_decoding(client, monkeypatch, case) -> None:
    fmt, width, height = EXTREME[case]
    data = _encoded(Image.new("L", (width, height), 90), fmt)
    assert len(data) < 100_000  # tiny on the wire
    decoded: list[object] = []
    monkeypatch.setattr(preprocess, "decode_opened", lambda *args: decoded.append(args))
    response = client.post("/classify?task=alpha", content=data, headers={"content-type": f"image/{fmt.lower()}"})
    assert response.status_code == 413, response.text
    assert "would be resized to" in response.json()["detail"] and "40000000" in response.json()["detail"]
    assert decoded == []


def test_request_pixel_budget_counts_the_resized_size(make_settings) -> None:
    image = _encoded(Image.new("RGB", (20, 2000)), "PNG")  # 40,000 decoded, 178 x 17,800 = 3.2 M resized
    with TestClient(create_app(make_settings(max_request_pixels=5_000_000))) as client:
        assert client.post("/classify?task=alpha", content=image, headers=PNG).status_code == 200
        two = [("file", (f"{i}.png", image, "image/png")) for i in range(2)]
        response = client.post("/classify?task=alpha", files=two)
        assert response.status_code == 413 and "resized" in response.json()["detail"]


_PEAK_RSS = r"""
import io, resource, sys
from PIL import Image
from app import preprocess
from timm.data import create_transform
transform = create_transform(input_size=(3, 224, 224), crop_pct=0.9, is_training=False)
side = preprocess.scale_size({"input_size": (3, 224, 224), "crop_pct": 0.9})
cases = [("PNG", 1, 250_000), ("PNG", 250_000, 1), ("WEBP", 1, 16_383), ("JPEG", 4, 65_000), ("PNG", 3, 40_000),
         ("PNG", 100, 16_000), ("JPEG", 16_000, 100), ("WEBP", 9_000, 60)]
images = []
for fmt, w, h in cases:
    buf = io.BytesIO(); Image.new("L", (w, h), 90).save(buf, format=fmt); images.append(buf.getvalue())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = []
for data in images:
    try:
        preprocess.decode(data, transform, 40_000_000, side)
        outcomes.append("ok")
    except preprocess.PayloadTooLarge:
        outcomes.append("413")
print(outcomes, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_decoding_any_aspect_ratio_and_format_stays_within_a_memory_bound() -> None:
    # A fresh process: its peak RSS is what these decodes added (MiB). The bound is what the pixel
    # limit allows one image (40 M resized RGB pixels, 120 MB, plus the resize's own copy) with room;
    # before the fix the first image alone peaked at gigabytes.
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, check=True)
    outcomes, grown = result.stdout.rsplit("]", 1)
    assert outcomes.count("'413'") >= 4 and outcomes.count("'ok'") >= 3, result.stdout
    assert int(grown) < 400, f"peak RSS grew by {grown} MiB"


# -- every mode Pillow decodes works, large or small --------------------------------------------------

def _modes() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (760, 800, 3), dtype=np.uint8))
    return {
        "palette": _encoded(rgb.convert("P"), "PNG"),
        "palette_transparency": _encoded(rgb.convert("P"), "PNG", transparency=0),
        "one_bit": _encoded(rgb.convert("1"), "PNG"),
        "grey16": _encoded(Image.fromarray(rng.integers(0, 65536, (760, 800), dtype=np.uint16)), "PNG"),
        "grey_alpha": _encoded(rgb.convert("LA"), "PNG"),
        "rgba": _encoded(rgb.convert("RGBA"), "PNG"),
        "grey": _encoded(rgb.convert("L"), "PNG"),
        "cmyk_jpeg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "grey_jpeg": _encoded(rgb.convert("L"), "JPEG"),
        "rgba_webp": _encoded(rgb.convert("RGBA"), "WEBP"),
    }


@pytest.mark.parametrize("mode", sorted(_modes()))
def test_every_decodable_mode_is_classified_when_reduced(client, mode) -> None:
    data = _modes()[mode]  # 800 x 760: reduced by 2 before the transform (its resize side is 178)
    kind = "image/jpeg" if mode.endswith("jpeg") else "image/webp" if mode.endswith("webp") else "image/png"
    response = client.post("/classify?task=alpha", content=data, headers={"content-type": kind})
    assert response.status_code == 200, response.text


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    transform = create_transform(input_size=(3, 160, 160), is_training=False)
    deep = _encoded(Image.fromarray(np.full((800, 800), 128 * 256, dtype=np.uint16)), "PNG")
    eight = _encoded(Image.new("L", (800, 800), 128), "PNG")
    got, expected = (preprocess.decode(d, transform, 10_000_000, 178) for d in (deep, eight))
    assert torch.equal(got, expected)  # mid grey stays mid grey (clipping made it white)


# -- multi-picture JPEGs (phones) are JPEGs ------------------------------------------------------------

def test_multi_picture_jpeg_is_classified_as_its_first_picture(client) -> None:
    rng = np.random.default_rng(1)
    first, second = (Image.fromarray(rng.integers(0, 256, (300, 320, 3), dtype=np.uint8)) for _ in range(2))
    mpo = _encoded(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    jpeg = {"content-type": "image/jpeg"}
    answer = client.post("/classify?task=alpha", content=mpo, headers=jpeg)
    assert answer.status_code == 200, answer.text
    plain = client.post("/classify?task=alpha", content=_encoded(first, "JPEG"), headers=jpeg)
    assert answer.json()["results"] == plain.json()["results"]


# -- adapters whose outputs overflow: refused at upload; never `null`, never a padded column ---------
# On the pico backbone. On the default hybrid no adapter within the 1e4 value limit reaches float32's
# 3.4e38 (its blocks' weights are ~0.02 and a LayerNorm precedes every branch: with every block tensor
# at 1e4 the residual stream peaks at ~4e20 and the logits stay finite), so there the probe rightly
# finds nothing to refuse; on the pico the same fills overflow.

PICO = "vit_pico_patch4_32.cifar5"


@pytest.fixture
def pico_store(tmp_path: Path) -> Path:
    store = tmp_path / "pico"
    for name, classes in (("five", 5), ("ten", 10)):
        model, _ = build_backbone(BackboneSpec(PICO))
        add_rlrr(model, RLRRConfig(), num_classes=classes)
        save_adapter(model, store / name, labels=[f"{name}-{i}" for i in range(classes)])
    return store


def _overflowing(store: Path, fill: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    tensors = load_file(store / "five" / "adapter_model.safetensors")
    return {k: torch.full_like(v, 1e4) if fill(k) else v for k, v in tensors.items()}


OVERFLOWING = {  # every value within the 1e4 value limit and the folded-weight bound
    "every_tensor": lambda k: True,
    "every_block_tensor": lambda k: k.startswith("blocks."),
}


def _adapter_files(store: Path, tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    weights = save(tensors)
    config = _config(store / "five")
    config["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    return json.dumps(config).encode(), weights


def _pico_settings(store: Path, **overrides: object) -> Settings:
    return Settings(**{"store": store, "backbone": PICO, "device": "cpu", "admin_token": "s3cret", "warmup": False,
                       "preprocess_workers": 1, **overrides})


@pytest.mark.parametrize("case", sorted(OVERFLOWING))
def test_upload_that_cannot_produce_finite_scores_is_refused(pico_store, case) -> None:
    config, weights = _adapter_files(pico_store, _overflowing(pico_store, OVERFLOWING[case]))
    before = _snapshot(pico_store)
    with TestClient(create_app(_pico_settings(pico_store))) as client:
        response = client.put("/tasks/overflow", headers=AUTH, files={
            "config": ("adapter_config.json", config), "weights": ("adapter_model.safetensors", weights)})
        assert response.status_code == 422, response.text
        assert "not finite" in response.json()["detail"]
        assert client.get("/tasks/overflow").status_code == 404
    assert _snapshot(pico_store) == before


def _probe_pngs() -> list[bytes]:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    images = [Image.new("RGB", (32, 32), c) for c in ((0, 0, 0), (255, 255, 255), (128, 128, 128))]
    return [_encoded(im, "PNG") for im in (*images, Image.fromarray(noise))]


def test_scores_are_never_null_and_a_bad_row_fails_alone(pico_store) -> None:
    # Written into the store by hand (start-up does not probe): the serving path must still hold.
    config, weights = _adapter_files(pico_store, _overflowing(pico_store, OVERFLOWING["every_tensor"]))
    (pico_store / "overflow").mkdir()
    (pico_store / "overflow" / "adapter_config.json").write_bytes(config)
    (pico_store / "overflow" / "adapter_model.safetensors").write_bytes(weights)
    # One form everywhere (the probe's), so whether an image overflows does not depend on the batch.
    settings = _pico_settings(pico_store, strategy="unmerged")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        statuses = []
        for image in _probe_pngs():
            response = client.post("/classify?task=overflow", content=image, headers=PNG)
            statuses.append(response.status_code)
            if response.status_code == 200:
                scores = [p["score"] for p in response.json()["results"][0]["predictions"]]
                assert all(isinstance(s, float) and 0 <= s <= 1 for s in scores), response.text
            else:
                assert response.status_code == 500 and "non-finite" in response.json()["detail"], response.text
        assert 500 in statuses
        # One batch with a 10-class task: its rows are answered, the overflowing rows fail alone.
        service = client.app.state.service
        # resident versions (a task is only stored until its first request), loaded on the app's loop
        overflow, ten = (client.portal.call(service.load_task, name) for name in ("overflow", "ten"))
        tensors = [overflow.transform(Image.open(io.BytesIO(png)).convert("RGB")) for png in _probe_pngs()]
        items = [BatchItem(task, x, 10) for x in tensors for task in (overflow, ten)]
        results = service.engine._run_batch(items)
    assert any(isinstance(r, AdapterFailure) for r in results)
    for item, result in zip(items, results, strict=True):
        if isinstance(result, AdapterFailure):
            assert item.task is overflow
            continue
        classes = item.task.adapter.num_classes
        assert len(result) == min(10, classes) and all(0 <= i < classes and 0 <= s <= 1 for i, s in result)


def test_top_k_ranks_only_a_rows_own_classes() -> None:
    def item(classes: int) -> BatchItem:
        task = SimpleNamespace(name=f"t{classes}", version="v", adapter=SimpleNamespace(num_classes=classes))
        return BatchItem(task, torch.zeros(1), 5)  # type: ignore[arg-type]

    inf, nan = float("inf"), float("nan")
    logits = torch.full((5, 7), -inf)
    logits[0, :3] = torch.tensor([-inf, -inf, -inf])  # no finite own logit: nothing to rank
    logits[1, :3] = torch.tensor([nan, 1.0, 2.0])
    logits[2, :3] = torch.tensor([inf, 1.0, 2.0])
    logits[3, :3] = torch.tensor([0.0, 1.0, 2.0])
    logits[4] = torch.arange(7.0)
    results = _top_k(logits, [item(3), item(3), item(3), item(3), item(7)])
    assert [isinstance(r, AdapterFailure) for r in results] == [True, True, True, False, False]
    assert [i for i, _ in results[3]] == [2, 1, 0] and [i for i, _ in results[4]] == [6, 5, 4, 3, 2]


# -- one body deadline and admission before the body, on every route that reads one -------------------

def _v2_body(images: list[bytes], **extra: object) -> bytes:
    return json.dumps({"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES",
                                   "data": [base64.b64encode(i).decode() for i in images]}], **extra}).encode()


def test_v2_infer_body_has_the_read_deadline(make_settings, serving) -> None:
    with serving(create_app(make_settings(warmup=False, body_timeout_s=0.5))) as port:
        start = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"error"' in answer and b"not received within 0.5 s" in answer
    assert time.monotonic() - start < 5


def test_v2_full_queue_is_503_before_the_body_is_read(client, monkeypatch) -> None:
    read: list[object] = []
    monkeypatch.setattr("app.routes.v2.read_body", lambda *args: read.append(args))
    monkeypatch.setattr(Batcher, "depth", property(lambda self: self.max_queue))
    response = client.post("/v2/models/alpha/infer", content=_v2_body([b"x"]))
    assert response.status_code == 503 and "error" in response.json()
    assert read == []


# -- numbers are parsed strictly -------------------------------------------------------------------------

DIGITS_ELSEWHERE = ["²", "¹²", "³", "١٢", "𝟏𝟐", "+12", "-1", "1_0", "0x10", "12 34", "٣"]


def test_counts_in_other_digits_are_400_not_500(make_settings, png, serving) -> None:
    # Over a real socket: the bytes as sent (a test client would re-encode the header as UTF-8).
    body = _v2_body([png(0)])
    with serving(create_app(make_settings(warmup=False))) as port:
        for value in DIGITS_ELSEWHERE:
            try:  # latin-1 where it can: the server reads header bytes as latin-1 ("²" is one byte, 0xB2)
                raw = value.encode("latin-1")
            except UnicodeEncodeError:
                raw = value.encode()
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /v2/models/alpha/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: " + raw +
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            sock.close()
            assert answer.startswith(b"HTTP/1.1 400"), (value, answer[:300])
            assert b"Inference-Header-Content-Length must be a byte count" in answer, (value, answer[-300:])
    assert all(parse_count(value) is None for value in DIGITS_ELSEWHERE)
    assert parse_count(" 12 ") == 12 and parse_count("0") == 0


# -- browser security headers, HEAD ---------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/docs", "/redoc", "/tasks", "/static/page.js", "/healthz", "/v2"])
def test_answers_carry_browser_security_headers(client, path) -> None:
    headers = client.get(path).headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"


def _get_paths(client: TestClient) -> list[str]:
    # Every GET operation of the API (parameters filled in), and the pages outside the schema.
    fill = {"{name}": "alpha", "{task}": "alpha", "{version}": client.get("/tasks/alpha").json()["version"]}
    paths = ["/", "/static/page.js", "/docs", "/redoc", "/openapi.json"]
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        if "get" in operations:
            for key, value in fill.items():
                path = path.replace(key, value)
            paths.append(path)
    return paths


def test_head_is_answered_on_every_get_route(client) -> None:
    paths = _get_paths(client)
    assert {"/", "/healthz", "/readyz", "/tasks", "/tasks/alpha", "/metrics", "/v2/health/live"} <= set(paths)
    for path in paths:
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], path
    assert client.head("/classify").status_code == 405


def test_head_sends_no_body_over_http(make_settings, serving) -> None:
    with serving(create_app(make_settings(warmup=False))) as port:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
    first, rest = answer.split(b"\r\n\r\n", 1)
    assert first.startswith(b"HTTP/1.1 200") and rest.startswith(b"HTTP/1.1 200"), answer  # no body between


# -- V2 speaks its own error body and refuses empty input -------------------------------------------------

@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v2/nope", 404), ("GET", "/v2/models", 404),
                                                         ("DELETE", "/v2/models/alpha/infer", 405),
                                                         ("PUT", "/v2/health/live", 405)])
def test_v2_router_errors_use_the_protocol_body(client, method, path, status) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize("body", [
    {"inputs": [{"name": "image", "shape": [0], "datatype": "BYTES", "data": []}]},
    {"inputs": [{"name": "image", "shape": [2, 0], "datatype": "BYTES", "data": []}]},
    {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AAAA"]}], "outputs": []},
])
def test_v2_empty_input_or_outputs_is_400(client, body) -> None:
    response = client.post("/v2/models/alpha/infer", json=body)
    assert response.status_code == 400, response.text
    assert "error" in response.json()


# -- labels a client could not tell apart or display ------------------------------------------------------

BAD_LABELS = {
    "duplicate": (["cat", "dog", "cat", "bird"], "same"),
    "empty": (["cat", "", "dog", "bird"], "empty or blank"),
    "blank": (["cat", "   ", "dog", "bird"], "empty or blank"),
    "invisible": (["cat", "\u200b\u3000", "dog", "bird"], "empty or blank"),
    "same_once_stripped": (["cat", "dog", "cat ", "bird"], "same"),
    "same_once_normalized": (["caf\u00e9", "dog", "cafe\u0301", "bird"], "same"),
    "huge": (["cat", "x" * 1_000_000, "dog", "bird"], "characters"),
    "control": (["cat", "dog\nbird", "fish", "bird"], "control character"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_unusable_labels_are_refused_and_store_nothing(client, store, make_upload, case) -> None:
    labels, reason = BAD_LABELS[case]
    upload = make_upload()
    before = _snapshot(store)
    response = client.put("/tasks/delta", files=_config_upload(upload, {**_config(upload), "labels": labels}),
                          headers=AUTH)
    assert response.status_code == 422 and reason in response.json()["detail"], response.text[:300]
    assert _snapshot(store) == before


@pytest.mark.parametrize(("labels", "reason"), [(["a", "a"], "same"), (["a", " "], "blank"),
                                               (["a", "\ud800"], "not valid Unicode")])
def test_trainer_cannot_save_unusable_labels(tmp_path, backbone_state, labels, reason) -> None:
    import timm

    model = timm.create_model("test_vit", pretrained=False)
    model.load_state_dict(backbone_state)
    add_rlrr(model, RLRRConfig.preset("rlrr"), num_classes=2)
    with pytest.raises(AdapterError, match=reason):
        save_adapter(model, tmp_path / "bad", base_model="test_vit", labels=labels)
    assert not (tmp_path / "bad").exists()


# -- uvicorn's own limits, the proxy's in deploy/ --------------------------------------------------------

def test_python_m_app_gives_uvicorn_its_connection_limits(monkeypatch) -> None:
    calls: list = []
    monkeypatch.setattr(app_main, "check_backbone", lambda settings: None)
    monkeypatch.setattr(app_main, "create_app", lambda settings: "app")
    monkeypatch.setattr(app_main, "bind", lambda settings: (None, None))  # no port taken

    class Server:  # uvicorn.Server, recording the config it is given instead of serving
        def __init__(self, config) -> None:
            calls.append(config)

        def run(self, sockets) -> None:
            pass

    monkeypatch.setattr(app_main.uvicorn, "Server", Server)
    assert app_main.main() == 0
    (config,) = calls
    assert config.timeout_keep_alive <= 10 and config.limit_concurrency >= 100
    assert config.http == "h11" and config.h11_max_incomplete_event_size <= 64 * 1024  # httptools: unbounded
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert re.search(r"^\s*client_header_timeout \d+s;", nginx, re.M)
    assert "client_header_timeout" in (REPO / "deploy" / "README.md").read_text()


def test_python_m_app_refuses_an_endless_header(start_server, store, checkpoint, tmp_path) -> None:
    env = {"RLRR_STORE": str(store), "RLRR_BACKBONE": "test_vit", "RLRR_CHECKPOINT": str(checkpoint),
           "RLRR_DEVICE": "cpu", "RLRR_WARMUP": "false", "RLRR_PREPROCESS_WORKERS": "1"}
    with start_server(env, tmp_path / "server.log") as url:
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        with pytest.raises(ConnectionError):  # reset once 16 KiB of headers are passed (httptools took 131 MB)
            while sent < 64 * 2**20:
                sock.sendall(b"a" * 65536)
                sent += 65536
        sock.close()
    assert sent < 16 * 2**20, sent  # what the kernel's socket buffers hold, no more


# -- a store folder the API cannot name: its reason says what to do ---------------------------------------

@pytest.mark.parametrize("folder", ["Bad Name", "UPPER", "x" * 65, "-dash"])
def test_store_folder_with_an_invalid_name_says_how_to_fix_it(make_settings, store, folder) -> None:
    shutil.copytree(store / "alpha", store / folder)
    with TestClient(create_app(make_settings())) as client:
        task = next(t for t in client.get("/tasks").json()["tasks"] if t["name"] == folder)
    assert task["state"] == "skipped"
    assert "rename the folder in the store" in task["reason"] and "remove it" in task["reason"]


# -- residuals of round two --------------------------------------------------------------------------------

def test_images_total_counts_only_answered_requests(make_settings, png, monkeypatch) -> None:
    original, calls = Engine._run_batch, []

    def second_batch_fails(self, items, *args, **kwargs):  # noqa: ANN001, ANN202
        calls.append(len(items))
        if len(calls) == 2:
            raise RuntimeError("provoked")
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(Engine, "_run_batch", second_batch_fails)
    settings = make_settings(warmup=False, max_batch_size=1, task_metrics=True)  # per-task series: opt-in
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        files = [("file", (f"{i}.png", png(i), "image/png")) for i in range(2)]
        assert c.post("/classify?task=alpha", files=files).status_code == 500
        assert 'rlrr_images_total{task="alpha"}' not in c.get("/metrics").text
        assert c.post("/classify?task=alpha", files=files).status_code == 200
        assert 'rlrr_images_total{task="alpha"} 2.0' in c.get("/metrics").text


@pytest.mark.parametrize(("edit", "expected"), [
    ({"mean": [0.5, 0.5]}, "mean must hold 1 value or 3"),
    ({"std": [0.2, 0.2]}, "std must hold 1 value or 3"),
])
def test_two_channel_normalization_is_named(client, make_upload, edit, expected) -> None:
    upload = make_upload()
    config = _config(upload)
    config.setdefault("data_config", {}).update(edit)
    response = client.put("/tasks/delta", files=_config_upload(upload, config), headers=AUTH)
    assert response.status_code == 422 and expected in response.json()["detail"], response.text


def test_deeply_nested_json_is_refused_with_a_reason(client, make_upload) -> None:
    upload = make_upload()
    text = json.dumps(_config(upload)).replace('"metadata": {}', '"metadata": {"x": ' + "[" * 5000 + "]" * 5000 + "}")
    response = client.put("/tasks/delta", files=_config_upload(upload, text.encode()), headers=AUTH)
    assert response.status_code == 422 and "nests arrays/objects 5002 deep" in response.json()["detail"]
    v2 = client.post("/v2/models/alpha/infer", content=b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert v2.status_code == 400 and "nested too deeply" in v2.json()["error"]
    assert "recursion" not in response.text + v2.text


def test_refusal_names_the_bad_image_of_a_request(client, png) -> None:
    files = [("file", ("a.png", png(0), "image/png")), ("file", ("b.png", b"junk", "image/png")),
             ("file", ("c.png", png(1), "image/png"))]
    detail = client.post("/classify?task=alpha", files=files).json()["detail"]
    assert detail.startswith("image 1 (of 3, counting from 0):"), detail
    truncated = png(2)[:200]
    v2 = client.post("/v2/models/alpha/infer", content=_v2_body([png(0), truncated])).json()["error"]
    assert v2.startswith("image 1 (of 2, counting from 0):"), v2


def test_uploaded_task_folder_has_the_mode_of_any_new_folder(client, store, make_upload) -> None:
    upload = make_upload()
    assert client.put("/tasks/delta", files=_config_upload(upload, _config(upload)), headers=AUTH).status_code == 200
    (store / "made").mkdir()
    assert (store / "delta").stat().st_mode & 0o777 == (store / "made").stat().st_mode & 0o777

