"""The Open Inference Protocol (KServe V2): a real tritonclient against a real server with the demo
store, and the wire format's edge cases through TestClient."""

from __future__ import annotations

import base64
import json
import re

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from app.main import create_app
from app.oip import join_bytes, split_bytes

JPEG = {"content-type": "image/jpeg"}


def _classify(url: str, image: bytes, top_k: int) -> list[dict]:
    """The JSON API's answer for one image (the reference the protocol must agree with)."""
    response = httpx.post(f"{url}/classify?task=ants-bees&top_k={top_k}", content=image, headers=JPEG, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["predictions"]


def _images_counted(url: str) -> float:
    # the demo server runs with default settings: images are counted without a per-task label
    match = re.search(r"^rlrr_images_total (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def oip(demo_server: str) -> triton.InferenceServerClient:
    client = triton.InferenceServerClient(url=demo_server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def _image_input(images: list[bytes], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    if binary:
        return tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    encoded = np.array([base64.b64encode(i).decode() for i in images], dtype=np.object_)
    return tensor.set_data_from_numpy(encoded, binary_data=False)


def test_health_and_metadata_through_tritonclient(oip: triton.InferenceServerClient, demo_server: str) -> None:
    assert oip.is_server_live() and oip.is_server_ready()
    server = oip.get_server_metadata()
    assert server["name"] == "rlrr-serve" and "binary_tensor_data" in server["extensions"]
    tasks = {t["name"]: t for t in httpx.get(f"{demo_server}/tasks").json()["tasks"]}
    model = oip.get_model_metadata("ants-bees")
    assert model["name"] == "ants-bees" and model["versions"] == [tasks["ants-bees"]["version"]]
    assert model["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"]) for o in model["outputs"]] == [("labels", "BYTES"), ("scores", "FP32")]
    assert oip.is_model_ready("ants-bees")
    assert oip.is_model_ready("ants-bees", model_version=tasks["ants-bees"]["version"])
    assert not oip.is_model_ready("ants-bees", model_version="000000000000")
    assert not oip.is_model_ready("no-such-task")
    with pytest.raises(InferenceServerException) as info:
        oip.get_model_metadata("no-such-task")
    assert info.value.status() == "404" and "unknown task 'no-such-task'" in info.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary-extension", "json-base64"])
def test_infer_equals_the_json_api(oip, demo_server: str, ant_photo: bytes, bee_photo: bytes, binary: bool) -> None:
    before = _images_counted(demo_server)
    outputs = [triton.InferRequestedOutput("labels", binary_data=binary),
               triton.InferRequestedOutput("scores", binary_data=binary)]
    result = oip.infer("ants-bees", [_image_input([ant_photo, bee_photo], binary)], outputs=outputs,
                       request_id="req-42", parameters={"top_k": 2})
    response = result.get_response()
    assert response["id"] == "req-42" and response["model_name"] == "ants-bees"
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape == (2, 2) and scores.dtype == np.float32
    for row, image in enumerate([ant_photo, bee_photo]):
        expected = _classify(demo_server, image, top_k=2)
        got = [label.decode() if isinstance(label, bytes) else label for label in labels[row]]
        assert got == [p["label"] for p in expected]
        assert scores[row].tolist() == pytest.approx([p["score"] for p in expected], abs=1e-5)
    assert labels[0][0] in (b"ants", "ants")  # the demo adapter gets this photo right (59% vs 41%)
    assert _images_counted(demo_server) == before + 4  # 2 by infer, 2 by /classify


def test_infer_defaults_to_binary_outputs_and_top_5(oip, demo_server: str, ant_photo: bytes) -> None:
    version = oip.get_model_metadata("cifar5")["versions"][0]
    result = oip.infer("cifar5", [_image_input([ant_photo])], model_version=version)
    assert result.as_numpy("labels").shape == (1, 5)
    assert result.as_numpy("scores")[0].tolist() == sorted(result.as_numpy("scores")[0].tolist(), reverse=True)
    assert result.get_response()["model_version"] == version


@pytest.mark.parametrize(("task", "images", "params", "status", "message"), [
    ("nope", "ant", {}, "404", "unknown task 'nope'"),
    ("ants-bees", "text", {}, "415", "not an image in a supported format"),
    ("ants-bees", "17", {}, "413", "17 images in one request; the limit is 16"),
    ("ants-bees", "ant", {"top_k": 0}, "400", "top_k must be an integer"),
    ("ants-bees", "empty", {}, "400", "empty image"),
])
def test_infer_errors_are_the_servers(oip, ant_photo: bytes, task: str, images: str, params: dict, status: str,
                                      message: str) -> None:
    data = {"ant": [ant_photo], "text": [b"plain text, not an image"], "17": [ant_photo] * 17, "empty": [b""]}[images]
    with pytest.raises(InferenceServerException) as info:
        oip.infer(task, [_image_input(data)], parameters=params)
    assert info.value.status() == status
    assert message in info.value.message()


def test_infer_error_is_the_same_as_classify(demo_server: str) -> None:
    body = b"GIF89a not really"
    classify = httpx.post(f"{demo_server}/classify?task=ants-bees", content=body, headers=JPEG)
    infer = httpx.post(f"{demo_server}/v2/models/ants-bees/infer", json={"inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(body).decode()]}]})
    assert infer.status_code == classify.status_code == 415
    assert infer.json() == {"error": classify.json()["detail"]}
    metrics = httpx.get(f"{demo_server}/metrics").text
    assert 'rlrr_requests_total{route="/v2/models/{task}/infer",status="415"}' in metrics  # no task label by default


def _request(images: list[bytes], **extra: object) -> dict:
    data = [base64.b64encode(i).decode() for i in images]
    return {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": data}], **extra}


def test_json_binary_and_classify_agree_on_every_score(client: TestClient, png, scores) -> None:
    images = [png(1), png(2), png(3)]
    answer = client.post("/v2/models/gamma/infer", json=_request(images, id="x", parameters={"top_k": 7}))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["id"] == "x" and body["model_version"] == client.get("/tasks/gamma").json()["version"]
    labels, values = body["outputs"][0], body["outputs"][1]
    assert labels["shape"] == values["shape"] == [3, 7]
    for row, image in enumerate(images):
        expected = scores(client.post("/classify?task=gamma&top_k=7", content=image,
                                      headers={"content-type": "image/png"}).json()["results"][0])
        got = dict(zip(labels["data"][row * 7:(row + 1) * 7], values["data"][row * 7:(row + 1) * 7], strict=True))
        assert got == pytest.approx(expected, abs=1e-5)
    header = json.dumps({"id": "y", "inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "parameters": {
        "binary_data_size": len(join_bytes(images))}}], "outputs": [{"name": "scores", "parameters": {
            "binary_data": True}}], "parameters": {"top_k": 7}}).encode()
    binary = client.post("/v2/models/gamma/infer", content=header + join_bytes(images),
                         headers={"Inference-Header-Content-Length": str(len(header))})
    assert binary.status_code == 200 and binary.headers["content-type"] == "application/octet-stream"
    size = int(binary.headers["inference-header-content-length"])
    head = json.loads(binary.content[:size])
    assert head["id"] == "y" and [o["name"] for o in head["outputs"]] == ["scores"]
    raw = np.frombuffer(binary.content[size:], dtype="<f4")
    # Two requests may run in different forms (a task folded into the cache once it is hot, or
    # segmented just in time): the same math in another order, ~1e-7 apart in float32.
    assert raw.tolist() == pytest.approx(values["data"], abs=1e-5)


def _binary(size: int, payload: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body: a JSON header (two images, `binary_data_size` = size) then `payload`."""
    header = json.dumps({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": size}}]}).encode()
    return header + payload, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize(("body", "headers", "status", "message"), [
    (b"{", {}, 400, "invalid inference request"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}', {}, 400, "neither data nor"),
    (b'{"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]}', {}, 400,
     "expected one input named 'image'"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}]}', {}, 400, "must be BYTES"),
    (b'{"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}]}', {}, 400,
     "shape [2] (2 elements) but 1 element(s)"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]}', {}, 400,
     "not valid base64"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]}', {}, 400,
     "must be a base64 string"),
    (*_binary(7, b"\x05\x00\x00\x00abc"), 400, "element 0 declares 5 bytes, 3 left"),
    (*_binary(7, b"\x03\x00\x00\x00abc"), 400, "shape [2] (2 elements) but 1 element(s)"),
    (*_binary(5, b"\x03\x00\x00\x00abc"), 400, "binary_data_size 5 does not match the 7 bytes"),
    (*_binary(0, b""), 400, "shape [2] (2 elements) but 0 element(s)"),
    (b"{}", {"Inference-Header-Content-Length": "99"}, 400, "within the 2-byte body"),
    (b"{}", {"Content-Encoding": "gzip"}, 415, "Content-Encoding 'gzip' not accepted"),
    (b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}], '
     b'"outputs": [{"name": "logits"}]}', {}, 400, "outputs must be distinct names"),
])
def test_malformed_requests_get_the_protocols_error(client: TestClient, body: bytes, headers: dict, status: int,
                                                    message: str) -> None:
    response = client.post("/v2/models/alpha/infer", content=body, headers=headers)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and message in response.json()["error"], response.json()


def test_limits_and_overload_match_classify(make_settings, png, monkeypatch) -> None:
    from app.batcher import Batcher

    with TestClient(create_app(make_settings(queue_size=1, max_body_bytes=4096))) as client:
        two = [png(1, size=(8, 8)), png(2, size=(8, 8))]
        never = client.post("/v2/models/alpha/infer", json=_request(two))  # can never fit: not a retry
        files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(two)]
        same = client.post("/classify?task=alpha", files=files)
        assert never.status_code == same.status_code == 413 and "retry-after" not in never.headers
        assert never.json()["error"] == same.json()["detail"]
        with monkeypatch.context() as m:
            m.setattr(Batcher, "depth", property(lambda self: self.max_queue))
            full = client.post("/v2/models/alpha/infer", json=_request(two[:1]))
        assert full.status_code == 503 and full.headers["retry-after"] == "1" and "queue full" in full.json()["error"]
        big = client.post("/v2/models/alpha/infer", json=_request([png(1)]))
        assert big.status_code == 413 and "over the limit of 4096" in big.json()["error"]
        assert client.get("/v2/models/alpha/versions/nope/ready").status_code == 404


def test_bytes_encoding_round_trips() -> None:
    elements = [b"", b"a", bytes(range(256)) * 3]
    assert split_bytes(join_bytes(elements)) == elements
    assert join_bytes([b"ab"]) == b"\x02\x00\x00\x00ab"


def test_openapi_documents_the_protocol(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    refs = set(re.findall(r"#/components/schemas/(\w+)", json.dumps(spec)))
    assert refs <= set(spec["components"]["schemas"])  # no dangling reference
    body = spec["paths"]["/v2/models/{task}/infer"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/octet-stream"}
    assert "inputs" in body["application/json"]["schema"]["required"]
    assert spec["paths"]["/v2/models/{task}/ready"]["get"]["responses"]["404"]
