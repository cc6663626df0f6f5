"""The Ray Serve application on a local Ray instance: 2 CPU replicas of test_vit, 3 multiplexed tasks.

Ray starts once for the module (about 10 s, plus the replicas' start-up); the single server runs
in-process on the same store and checkpoint as the oracle.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): Ray Serve tests skipped")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
ray_serve = pytest.importorskip("app.ray_serve")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Both servers run the same engine code in float32 on CPU; they may batch differently (merged vs
# unmerged forward), which reorders float sums: differences stay ~1e-7, the engine tests' bound is 1e-5.
SCORE_TOL = 1e-5
BACKBONE = "test_vit"
TASKS = ("alpha", "beta", "gamma")  # the store of conftest.built_store
REPLICAS = 2
REPEATS = 6  # requests per task after the first
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_settings(built_store: tuple[Path, dict], checkpoint: Path) -> Settings:
    # The store is only read by both servers, so the session copy is shared.
    return Settings(backbone=BACKBONE, checkpoint=checkpoint, store=built_store[0], device="cpu",
                    max_wait_ms=2.0, preprocess_workers=1, ray_replicas=REPLICAS, ray_cpus=0.5)


@pytest.fixture(scope="module")
def ray_url(ray_settings: Settings) -> Iterator[str]:
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.build_app(dict(ray_settings)), name="rlrr", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def http(ray_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def single(ray_settings: Settings) -> Iterator[TestClient]:
    """The single server on the same settings: the answers Ray must reproduce."""
    with TestClient(create_app(ray_settings)) as c:
        yield c


def _classify(client: httpx.Client | TestClient, task: str, image: bytes) -> httpx.Response:
    return client.post(f"/classify?task={task}&top_k=10", content=image, headers={"content-type": "image/png"})


def test_answers_equal_single_server(http: httpx.Client, single: TestClient, png: Callable[..., bytes],
                                     scores: Callable[[dict], dict[str, float]]) -> None:
    for seed, task in enumerate(TASKS):
        image = png(seed)
        got, want = _classify(http, task, image), _classify(single, task, image)
        assert got.status_code == want.status_code == 200, got.text
        assert got.headers[ray_serve.REPLICA_HEADER]
        g, w = got.json(), want.json()
        assert {k: g[k] for k in ("task", "adapter_version", "backbone_fingerprint")} == \
               {k: w[k] for k in ("task", "adapter_version", "backbone_fingerprint")}
        ranked = [p["label"] for p in g["results"][0]["predictions"]]
        assert ranked == [p["label"] for p in w["results"][0]["predictions"]]
        assert scores(g["results"][0]) == pytest.approx(scores(w["results"][0]), abs=SCORE_TOL)


def test_tasks_health_metrics_and_errors_match(http: httpx.Client, single: TestClient,
                                               png: Callable[..., bytes]) -> None:
    got, want = http.get("/tasks").json(), single.get("/tasks").json()
    assert got["backbone"] == want["backbone"]
    fields = ("name", "state", "version", "num_classes", "parameters", "bytes", "base_model", "metrics")
    assert [{k: t[k] for k in fields} for t in got["tasks"]] == [{k: t[k] for k in fields} for t in want["tasks"]]
    assert http.get("/tasks/alpha").json()["labels"] == single.get("/tasks/alpha").json()["labels"]
    assert http.get("/healthz").json() == {"status": "ok", "tasks": None}
    assert http.get("/readyz").json() == single.get("/readyz").json() == {"status": "ready", "tasks": len(TASKS)}
    for path in ("/classify?task=nope", "/classify?task=Bad!", "/tasks/nope"):
        call = (lambda c, p=path: c.get(p)) if path.startswith("/tasks") else (
            lambda c, p=path: c.post(p, content=png(0), headers={"content-type": "image/png"}))
        g, w = call(http), call(single)
        assert g.status_code == w.status_code, path
        assert g.json()["detail"] == w.json()["detail"], path
    bad = http.post("/classify?task=alpha", content=b"not an image", headers={"content-type": "image/png"})
    assert bad.status_code == 415
    text = http.get("/metrics").text
    assert 'rlrr_requests_total{route="/classify",status="200"}' in text  # per-task labels are opt-in
    assert "rlrr_replica_requests_total{replica=" in text and 'task="' not in text


def test_v2_through_the_same_front(http: httpx.Client, single: TestClient, png: Callable[..., bytes]) -> None:
    # The KServe V2 routes reach the replicas through the ingress, with the single server's answers.
    body = {"id": "7", "parameters": {"top_k": 3}, "inputs": [
        {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(png(1)).decode()]}]}
    got, want = http.post("/v2/models/beta/infer", json=body), single.post("/v2/models/beta/infer", json=body)
    assert got.status_code == want.status_code == 200, got.text
    g, w = got.json(), want.json()
    assert (g["model_name"], g["model_version"], g["id"]) == (w["model_name"], w["model_version"], "7")
    outputs = lambda answer: {o["name"]: o["data"] for o in answer["outputs"]}
    assert outputs(g)["labels"] == outputs(w)["labels"]
    assert outputs(g)["scores"] == pytest.approx(outputs(w)["scores"], abs=SCORE_TOL)
    version = w["model_version"]  # the infer answer's (the loop below reuses no name of it)
    for path in ("/v2/models/beta", "/v2/models/beta/ready", "/v2/health/ready", "/v2/models/nope"):
        gr, wr = http.get(path), single.get(path)
        assert (gr.status_code, gr.json()) == (wr.status_code, wr.json()), path
    assert http.get(f"/v2/models/beta/versions/{version}/ready").status_code == 200
    assert http.post("/v2/models/beta/versions/0000/infer", json=body).status_code == 404


def test_a_tasks_requests_stay_on_one_replica(http: httpx.Client, png: Callable[..., bytes]) -> None:
    first = {}
    for seed, task in enumerate(TASKS):
        first[task] = _classify(http, task, png(seed)).headers[ray_serve.REPLICA_HEADER]
    time.sleep(1.0)  # replicas report the tasks they hold every 0.1 s; the routers learn it by long poll
    for seed, task in enumerate(TASKS):
        for i in range(REPEATS):
            response = _classify(http, task, png(100 + 10 * seed + i))
            assert response.status_code == 200
            assert response.headers[ray_serve.REPLICA_HEADER] == first[task], (task, i)
    counts = http.get("/replicas").json()["replicas"]
    print("\nrequests per replica and task:", counts)
    for task in TASKS:
        serving = [r for r, c in counts.items() if c["requests"].get(task)]
        assert serving == [first[task]], (task, counts)
        assert task in counts[first[task]]["tasks_held"]


@pytest.fixture(scope="module")
def small(ray_url: str, ray_settings: Settings, built_store: tuple[Path, dict],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    """A second application: 1 replica with room for 1 task (a byte budget of 1), on a store the test may change."""
    store = Path(shutil.copytree(built_store[0], tmp_path_factory.mktemp("ray") / "store"))
    args = {**dict(ray_settings), "store": store, "ray_replicas": 1, "resident_bytes": 1}
    serve.run(ray_serve.build_app(args), name="small", route_prefix="/small")
    with httpx.Client(base_url=f"{ray_url}/small", timeout=60) as c:
        yield c, store
    serve.delete("small")


def test_lru_eviction_and_store_changes_reach_the_replica(small: tuple[httpx.Client, Path],
                                                          png: Callable[..., bytes]) -> None:
    http, store = small
    alpha = _classify(http, "alpha", png(0)).json()
    for _ in range(2):  # the second call sees alpha's unload, which Serve's eviction only schedules
        assert _classify(http, "beta", png(0)).status_code == 200
    assert http.get("/replicas").json()["replicas"].popitem()[1]["tasks_held"] == ["beta"]
    # Replace alpha by gamma's files, the way save_adapter does: a whole folder renamed into place.
    shutil.copytree(store / "gamma", store / ".alpha.tmp")
    os.replace(store / "alpha", store / ".alpha.old")
    os.replace(store / ".alpha.tmp", store / "alpha")
    gamma = _classify(http, "gamma", png(0)).json()
    replaced = _classify(http, "alpha", png(0)).json()
    assert replaced["adapter_version"] == gamma["adapter_version"] != alpha["adapter_version"]
    assert replaced["results"] == gamma["results"]
    shutil.rmtree(store / "alpha")
    gone = _classify(http, "alpha", png(0))
    assert gone.status_code == 404 and gone.json()["detail"] == "unknown task 'alpha'"


def test_replica_count_autoscaling_and_gpu_fraction_from_settings() -> None:
    fixed = ray_serve.classifier_options(Settings(ray_replicas=3, ray_gpus=0.5, ray_cpus=2))
    assert fixed["num_replicas"] == 3
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    scaled = ray_serve.classifier_options(Settings(ray_replicas=1, ray_max_replicas=8, ray_target_requests=4))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 4}



def test_serve_yaml_builds_the_application() -> None:
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "deploy" / "serve.yaml").read_text()))
    (application,) = config.applications
    assert application.import_path == "app.ray_serve:build_app"
    settings = Settings(**application.args)
    assert settings.ray_gpus == 0.5 and settings.ray_max_replicas > settings.ray_replicas
    assert isinstance(ray_serve.build_app(application.args), serve.Application)



def test_ingress_mounts_the_single_servers_routes_but_no_admin_ones() -> None:
    paths = ray_serve.Ingress(None, Settings()).__serve_build_asgi_app__().openapi()["paths"]
    single = create_app(Settings()).openapi()["paths"]
    # One router list: every route of the single server, the Open Inference Protocol's too, plus /replicas
    assert set(paths) == set(single) | {"/replicas"}
    assert {"/classify", "/tasks", "/healthz", "/v2/models/{task}/infer", "/v2/health/ready"} <= set(paths)
    assert set(paths["/tasks/{name}"]) == {"get"}  # no upload or delete: adapters are written into the store
    for path in paths.keys() - {"/replicas"}:  # the same routes: same parameters, bodies and answers
        assert all(paths[path][method] == single[path][method] for method in paths[path]), path
