"""Every bad input of the API gets its status and a reason; none gives a 500."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.batcher import Batcher
from app.main import create_app

PNG = {"content-type": "image/png"}


def test_unknown_task_is_404_listing_tasks(client, png) -> None:
    response = client.post("/classify?task=nope", content=png(0), headers=PNG)
    assert response.status_code == 404
    assert response.json()["tasks"] == ["alpha", "beta", "gamma"]
    assert "nope" in response.json()["detail"]


def test_missing_task_is_422(client, png) -> None:
    assert client.post("/classify", content=png(0), headers=PNG).status_code == 422


@pytest.mark.parametrize("name", ["../etc", "Alpha", "_x", ".hidden", "a/b", "a" * 65, "a b", "ä"])
def test_bad_task_name_is_422(client, png, name) -> None:
    response = client.post("/classify", params={"task": name}, content=png(0), headers=PNG)
    assert response.status_code == 422


@pytest.mark.parametrize("top_k", [0, -1, 1001, "x"])
def test_bad_top_k_is_422(client, png, top_k) -> None:
    assert client.post(f"/classify?task=alpha&top_k={top_k}", content=png(0), headers=PNG).status_code == 422


def test_undecodable_body(client) -> None:
    response = client.post("/classify?task=alpha", content=b"definitely not an image", headers=PNG)
    assert response.status_code == 415
    assert "not an image" in response.json()["detail"]


def test_truncated_image_is_400(client, png) -> None:
    data = png(0, size=(300, 300))
    response = client.post("/classify?task=alpha", content=data[: len(data) // 2], headers=PNG)
    assert response.status_code == 400
    assert "cannot decode" in response.json()["detail"]


def test_unsupported_image_format_is_415(client, png) -> None:
    response = client.post("/classify?task=alpha", content=png(0, fmt="BMP"), headers=PNG)
    assert response.status_code == 415
    assert "BMP" in response.json()["detail"]


def test_unsupported_content_type_is_415(client, png) -> None:
    response = client.post("/classify?task=alpha", content=png(0), headers={"content-type": "text/plain"})
    assert response.status_code == 415


def test_empty_body_is_400(client) -> None:
    assert client.post("/classify?task=alpha", content=b"", headers=PNG).status_code == 400


def test_body_over_byte_limit_is_413(make_settings, png) -> None:
    with TestClient(create_app(make_settings(max_body_bytes=1000))) as client:
        response = client.post("/classify?task=alpha", content=png(0), headers=PNG)
        assert response.status_code == 413
        # a chunked body (no Content-Length) is cut off as it streams in
        chunks = iter([png(0)[:800], png(0)[800:]])
        response = client.post("/classify?task=alpha", content=chunks, headers=PNG)
        assert response.status_code == 413


def test_image_over_pixel_limit_is_413(make_settings, png) -> None:
    with TestClient(create_app(make_settings(max_pixels=100 * 100))) as client:
        response = client.post("/classify?task=alpha", content=png(0, size=(101, 100)), headers=PNG)
        assert response.status_code == 413
        assert "pixels" in response.json()["detail"]


def test_decompression_bomb_is_413(client) -> None:
    # 20000 x 20000 single-colour PNG: ~1 MB compressed, 1.2 GB decoded; refused from its header.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    response = client.post("/classify?task=alpha", content=buf.getvalue(), headers=PNG)
    assert response.status_code == 413


def test_too_many_images_is_413(make_settings, png) -> None:
    with TestClient(create_app(make_settings(max_images=2))) as client:
        files = [("file", (f"{i}.png", png(i), "image/png")) for i in range(3)]
        response = client.post("/classify?task=alpha", files=files)
        assert response.status_code == 413
        assert "3 images" in response.json()["detail"]


def test_multipart_without_file_field_is_400(client, png) -> None:
    response = client.post("/classify?task=alpha", files=[("image", ("a.png", png(0), "image/png"))])
    assert response.status_code == 400


@pytest.mark.parametrize("ctype", ["multipart/form-data; boundary=xyz", "multipart/form-data"])
def test_malformed_multipart_is_400(client, ctype) -> None:
    response = client.post("/classify?task=alpha", content=b"--xyz\r\nbroken", headers={"content-type": ctype})
    assert response.status_code == 400


def test_one_bad_image_among_good_ones_fails_the_request_cleanly(client, png) -> None:
    files = [("file", ("a.png", png(0), "image/png")), ("file", ("b.png", b"junk", "image/png"))]
    response = client.post("/classify?task=alpha", files=files)
    assert response.status_code == 415
    assert client.post("/classify?task=alpha", content=png(0), headers=PNG).status_code == 200


def test_full_queue_is_503_with_retry_after(make_settings, png, monkeypatch) -> None:
    with TestClient(create_app(make_settings(queue_size=2, max_images=4))) as client:
        monkeypatch.setattr(Batcher, "depth", property(lambda self: 1))  # one image already waiting
        files = [("file", (f"{i}.png", png(i), "image/png")) for i in range(2)]
        response = client.post("/classify?task=alpha", files=files)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "1/2" in response.json()["detail"]


def test_unknown_route_and_method(client) -> None:
    assert client.get("/nothing").status_code == 404
    assert client.get("/classify?task=alpha").status_code == 405
