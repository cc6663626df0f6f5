"""The tiers of a task (stored -> resident -> folded): loading on demand, eviction, pinning, metrics, paging."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from app.main import create_app

AUTH = {"authorization": "Bearer s3cret"}
PNG = {"content-type": "image/png"}
NAMES = ["alpha", "beta", "gamma"]
# Served probabilities vs the directly merged timm model, both float32: they differ by rounding in
# another order of operations (~1e-7); a wrong task, stale version or wrong row moves them by > 1e-2.
TOL = 1e-5


def _files(directory: Path) -> dict[str, tuple[str, bytes]]:
    return {"config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes())}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match is not None, name
    return float(match.group(1))


def _post(client: TestClient, task: str, image: bytes) -> httpx.Response:
    return client.post(f"/classify?task={task}&top_k=10", content=image, headers=PNG)


def _tier(client: TestClient, name: str) -> str | None:
    return client.get(f"/tasks/{name}").json()["tier"]


def test_start_up_reads_configs_not_tensors(make_settings, png, monkeypatch) -> None:
    import app.registry

    loads: list[str] = []
    real = app.registry.load_adapter
    monkeypatch.setattr(app.registry, "load_adapter", lambda d, *a, **k: loads.append(Path(d).name) or real(d, *a, **k))
    with TestClient(create_app(make_settings(warmup=False))) as client:
        assert loads == []  # nothing resident until asked for
        body = client.get("/tasks").json()
        assert [(t["name"], t["state"], t["tier"]) for t in body["tasks"]] == [
            ("alpha", "loaded", "stored"), ("beta", "loaded", "stored"), ("gamma", "loaded", "stored")]
        stored = {t["name"]: t for t in body["tasks"]}
        assert stored["alpha"]["num_classes"] == 5 and stored["alpha"]["labels"][0] == "alpha-class-0"
        assert stored["alpha"]["bytes"] == 4 * stored["alpha"]["parameters"] > 0  # from the safetensors header
        assert client.get("/readyz").json()["tasks"] == 3
        service = client.app.state.service
        decode = service.preprocessor.decode_many

        async def decode_after_prefetch(*args, **kwargs):  # noqa: ANN002, ANN003
            entry = service.registry.entries["beta"]  # its load started at admission, before the body was read
            assert entry.loading is not None or entry.resident is not None
            return await decode(*args, **kwargs)

        service.preprocessor.decode_many = decode_after_prefetch
        assert _post(client, "beta", png(0)).status_code == 200
        assert _tier(client, "beta") == "resident"
        detail = client.get("/tasks/beta").json()
        assert detail["bytes"] == stored["beta"]["bytes"] and detail["version"] == stored["beta"]["version"]
    assert loads == ["beta"]


@pytest.mark.parametrize("warmup", [False, True])
def test_eviction_keeps_every_answer_identical(make_settings, refs, png, scores, warmup) -> None:
    # SGLang's pattern: with room for one task, cycle every task forward then in reverse, twice; each
    # (task, image) answer is the same every time, and equal to the task's own merged model.
    settings = make_settings(resident_bytes=1, strategy="segmented", merged_cache_bytes=0, warmup=warmup)
    images = [png(40 + i) for i in range(2)]
    seen: dict[tuple[str, int], list[dict[str, float]]] = {}
    with TestClient(create_app(settings)) as client:
        for order in (NAMES, NAMES[::-1], NAMES, NAMES[::-1]):
            for name in order:
                for i, image in enumerate(images):
                    response = _post(client, name, image)
                    assert response.status_code == 200, response.text
                    seen.setdefault((name, i), []).append(scores(response.json()["results"][0]))
                assert [n for n in NAMES if _tier(client, n) != "stored"] == [name]  # only the last one resident
        text = client.get("/metrics").text
    for (name, i), answers in seen.items():
        assert all(a == answers[0] for a in answers), (name, i)  # one code path: bit-identical
        want = refs[name].probs(images[i])
        assert [answers[0][label] for label in refs[name].labels] == pytest.approx(want.tolist(), abs=TOL)
    # a b c | c b a | a b c | c b a: every change of task evicts the previous one (8), nothing else does
    assert _metric(text, "rlrr_adapter_evictions_total") == 8
    assert _metric(text, "rlrr_adapter_load_seconds_count") == 9
    assert _metric(text, "rlrr_tasks_resident") == 1


def test_concurrent_requests_for_a_stored_task_share_one_load(make_settings, png) -> None:
    with TestClient(create_app(make_settings(warmup=False, max_wait_ms=20.0))) as client:
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(lambda i: _post(client, "gamma", png(i)).status_code, range(8)))
        assert statuses == [200] * 8
        assert _metric(client.get("/metrics").text, "rlrr_adapter_load_seconds_count") == 1


def test_a_replaced_evicted_task_answers_with_its_new_adapter(make_settings, make_upload, png, scores) -> None:
    with TestClient(create_app(make_settings(resident_bytes=1))) as client:
        old = _post(client, "alpha", png(1)).json()
        assert _post(client, "beta", png(1)).status_code == 200
        assert _tier(client, "alpha") == "stored"  # evicted
        upload = client.put("/tasks/alpha", files=_files(make_upload(classes=4, seed=11)), headers=AUTH)
        assert upload.status_code == 200 and upload.json()["tier"] == "resident"
        for _ in range(2):  # right after the upload, and once evicted and reloaded again
            new = _post(client, "alpha", png(1)).json()
            assert new["adapter_version"] == upload.json()["version"] != old["adapter_version"]
            assert set(scores(new["results"][0])) == {"up-0", "up-1", "up-2", "up-3"}
            assert _post(client, "gamma", png(1)).status_code == 200  # evicts alpha
            assert _tier(client, "alpha") == "stored"


def test_a_deleted_evicted_task_is_gone(make_settings, png) -> None:
    with TestClient(create_app(make_settings(resident_bytes=1))) as client:
        assert _post(client, "beta", png(0)).status_code == 200
        assert _post(client, "gamma", png(0)).status_code == 200
        assert client.delete("/tasks/beta", headers=AUTH).status_code == 204
        assert _post(client, "beta", png(0)).status_code == 404
        assert client.get("/tasks/beta").status_code == 404
        assert [t["name"] for t in client.get("/tasks").json()["tasks"]] == ["alpha", "gamma"]


def test_pinned_tasks_are_never_evicted(make_settings, make_upload, png) -> None:
    with TestClient(create_app(make_settings(resident_bytes=1, pinned_tasks="gamma"))) as client:
        engine, registry = client.app.state.service.engine, client.app.state.service.registry
        gamma = registry.entries["gamma"].resident
        assert gamma is not None  # loaded at start-up
        upload = client.put("/tasks/delta?pinned=true", files=_files(make_upload()), headers=AUTH)
        assert upload.json()["pinned"] is True
        for name in ["alpha", "beta", "alpha", "beta"]:
            assert _post(client, name, png(0)).status_code == 200
        assert registry.entries["gamma"].resident is gamma and gamma.key in engine.multi.task_names
        assert _tier(client, "delta") == "resident" and client.get("/tasks/gamma").json()["pinned"] is True
        text = client.get("/metrics").text
        assert _metric(text, "rlrr_tasks_pinned") == 2
        assert _metric(text, "rlrr_tasks_resident") == 3  # the two pinned and the last one asked for


@pytest.mark.parametrize("damage,reason", [("checksum", "checksum"), ("tensors", "missing")])
def test_a_stored_task_broken_at_its_first_load(make_settings, store, png, damage, reason) -> None:
    shutil.copytree(store / "alpha", store / "broken")
    weights = store / "broken" / "adapter_model.safetensors"
    if damage == "checksum":
        weights.write_bytes((store / "beta" / "adapter_model.safetensors").read_bytes())
    else:  # a valid file with its checksum, but not the tensors its config names
        tensors = load_file(str(weights))
        save_file({k: v for k, v in tensors.items() if "blocks.1." not in k}, str(weights))
        config = json.loads((store / "broken" / "adapter_config.json").read_text())
        config["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        (store / "broken" / "adapter_config.json").write_text(json.dumps(config))
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/tasks/broken").json()["state"] == "loaded"  # its config is fine
        first = _post(client, "broken", png(0))
        assert first.status_code == 404 and reason in first.json()["detail"], first.text
        detail = client.get("/tasks/broken").json()
        assert detail["state"] == "skipped" and reason in detail["reason"]
        again = _post(client, "broken", png(0))
        assert again.status_code == 404 and reason in again.json()["detail"]
        assert _post(client, "beta", png(0)).status_code == 200  # others unaffected
        text = client.get("/metrics").text
        assert _metric(text, "rlrr_adapter_load_failures_total") == 1
        assert _metric(text, "rlrr_adapters_skipped") == 1
        # fixed in the store (a whole folder renamed into place): served on the next request
        shutil.copytree(store / "gamma", store / ".broken.tmp")
        shutil.rmtree(store / "broken")
        (store / ".broken.tmp").rename(store / "broken")
        assert _post(client, "broken", png(0)).status_code == 200


def test_a_task_that_appears_in_the_store_is_served_on_its_first_request(client, store, png) -> None:
    assert _post(client, "newcomer", png(0)).status_code == 404
    shutil.copytree(store / "gamma", store / "newcomer")  # e.g. `python -m trainer` publishing into the store
    response = _post(client, "newcomer", png(0))
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["predictions"][0]["label"].startswith("gamma-class-")
    assert "newcomer" in [t["name"] for t in client.get("/tasks").json()["tasks"]]


def test_no_per_task_series_by_default_and_residency_gauges_move(make_settings, png) -> None:
    with TestClient(create_app(make_settings(warmup=False, resident_bytes=1))) as client:
        text = client.get("/metrics").text
        assert [_metric(text, f"rlrr_tasks_{t}") for t in ("stored", "resident", "folded", "pinned")] == [3, 0, 0, 0]
        assert _metric(text, "rlrr_resident_bytes") == 0 and _metric(text, "rlrr_resident_budget_bytes") == 1
        assert _post(client, "alpha", png(0)).status_code == 200
        text = client.get("/metrics").text
        alpha = client.get("/tasks/alpha").json()["bytes"]
        assert _metric(text, "rlrr_tasks_resident") == 1 and _metric(text, "rlrr_resident_bytes") == alpha
        assert _metric(text, "rlrr_adapter_evictions_total") == 0
        assert _post(client, "beta", png(0)).status_code == 200
        text = client.get("/metrics").text
        assert _metric(text, "rlrr_tasks_resident") == 1 and _metric(text, "rlrr_adapter_evictions_total") == 1
        assert _metric(text, "rlrr_adapter_load_seconds_count") == 2
        assert _metric(text, "rlrr_images_total") == 2
        assert 'task="' not in text  # no series per task unless RLRR_TASK_METRICS


def test_task_list_pages_and_filters(make_settings, store) -> None:
    for i in range(12):
        shutil.copytree(store / "beta", store / f"extra-{i:02d}")
    with TestClient(create_app(make_settings(warmup=False))) as client:
        names, cursor = [], None
        while True:
            page = client.get("/tasks", params={"limit": 4, **({"cursor": cursor} if cursor else {})}).json()
            assert len(page["tasks"]) <= 4 and page["total"] == 15
            names += [t["name"] for t in page["tasks"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert names == sorted(p.name for p in store.iterdir())
        found = client.get("/tasks", params={"name": "XTRA-1"}).json()
        assert [t["name"] for t in found["tasks"]] == ["extra-10", "extra-11"] and found["total"] == 2
        assert client.get("/tasks", params={"limit": 0}).status_code == 422
        assert client.get("/tasks", params={"limit": 1001}).status_code == 422


def test_task_list_reads_no_adapter_and_health_answers_meanwhile(make_settings, store, serving, monkeypatch) -> None:
    # Issue 21, finding 6: GET /tasks used to validate every adapter (reading its tensors) on the event
    # loop, ~1.3 s per call with 1,000 tasks. A page is built from what start-up read: no store I/O,
    # one summary per listed task, so concurrent listings cannot starve /healthz.
    import app.registry
    import app.service

    for i in range(300):
        shutil.copytree(store / "alpha", store / f"t{i:03d}")
    built: list[str] = []
    real = app.service.entry_info
    monkeypatch.setattr(app.service, "entry_info", lambda e, f: built.append(e.name) or real(e, f))
    application = create_app(make_settings(warmup=False))
    with serving(application) as port:
        def forbidden(*args, **kwargs):  # noqa: ANN002, ANN003
            raise AssertionError("GET /tasks read the store")

        for name in ("load_adapter", "read_adapter_config", "_tensor_sizes"):
            monkeypatch.setattr(app.registry, name, forbidden)
        url = f"http://127.0.0.1:{port}"
        with ThreadPoolExecutor(max_workers=9) as pool:
            pages = [pool.submit(httpx.get, f"{url}/tasks", params={"limit": 50}, timeout=60) for _ in range(8)]
            health = pool.submit(httpx.get, f"{url}/healthz", timeout=60)
            assert health.result().status_code == 200
            bodies = [p.result().json() for p in pages]
    assert all(len(b["tasks"]) == 50 and b["total"] == 303 for b in bodies)
    assert len(built) == 8 * 50  # one summary per listed task, none for the other 253


@pytest.mark.parametrize(("value", "expected"), [("a, b", ["a", "b"]), ("", []), ('["x"]', ["x"]), ("x,", ["x"])])
def test_pinned_tasks_from_env(monkeypatch, value: str, expected: list[str]) -> None:
    from app.settings import Settings

    monkeypatch.setenv("RLRR_PINNED_TASKS", value)  # docker compose passes an unset `${VAR:-}` as ""
    assert Settings().pinned_tasks == expected


def _gate_the_scan(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the background scan until the returned event is set (so a test sees the unread state)."""
    import app.registry

    gate = threading.Event()
    real_scan = app.registry.Registry._scan

    async def gated_scan(self):  # noqa: ANN001, ANN202
        await asyncio.to_thread(gate.wait, 60)
        await real_scan(self)

    monkeypatch.setattr(app.registry.Registry, "_scan", gated_scan)
    return gate


@contextlib.contextmanager
def _opens(gate: threading.Event) -> Iterator[None]:
    try:  # a failed assertion must not leave the scan's thread waiting (shutdown would wait for it)
        yield
    finally:
        gate.set()


def test_configs_beyond_startup_configs_are_read_in_the_background(make_settings, store, png, monkeypatch) -> None:
    # Issue 19: start-up must not grow with the store. Beyond RLRR_STARTUP_CONFIGS the configs are read by
    # a background scan while the server serves; a request, a page or a delete of a task the scan has not
    # reached reads (or drops) it at once, and the scan never revives or overwrites what changed meanwhile.

    (store / "zeta").mkdir()
    (store / "zeta" / "adapter_config.json").write_text("{broken")  # refused only once the scan reads it
    gate = _gate_the_scan(monkeypatch)
    with TestClient(create_app(make_settings(warmup=False, startup_configs=1))) as client, _opens(gate):
        registry = client.app.state.service.registry
        assert sorted(registry.entries) == ["alpha"] and registry.pending == 3  # beta, gamma, zeta unread
        assert client.get("/readyz").json()["tasks"] == 4  # listed, not yet known to be refused
        text = client.get("/metrics").text
        assert _metric(text, "rlrr_tasks_stored") == 4 and _metric(text, "rlrr_tasks_unread") == 3
        response = _post(client, "gamma", png(0))  # read now, not after the scan
        assert response.status_code == 200 and _tier(client, "gamma") == "resident"
        assert response.json()["results"][0]["predictions"][0]["label"].startswith("gamma-class-")
        assert client.delete("/tasks/beta", headers=AUTH).status_code == 204  # never read, gone
        assert registry.pending == 1
        gate.set()
        for _ in range(600):
            if registry.scan.done():
                break
            time.sleep(0.05)
        assert registry.scan.done() and registry.scan.exception() is None and registry.pending == 0
        assert registry.names() == ["alpha", "gamma", "zeta"]  # beta not revived by the scan
        assert _post(client, "beta", png(0)).status_code == 404
        assert "zeta" in registry.skipped and client.get("/readyz").json()["tasks"] == 2
        assert _metric(client.get("/metrics").text, "rlrr_tasks_unread") == 0
        assert _tier(client, "gamma") == "resident"  # the scan left the resident version alone


def test_a_page_reads_the_configs_the_scan_has_not_reached(make_settings, store, monkeypatch) -> None:

    gate = _gate_the_scan(monkeypatch)
    with TestClient(create_app(make_settings(warmup=False, startup_configs=0))) as client, _opens(gate):
        registry = client.app.state.service.registry
        assert registry.pending == 3
        page = client.get("/tasks", params={"limit": 1}).json()  # reads limit + 1 (is there a next page?)
        assert [(t["name"], t["labels"][0]) for t in page["tasks"]] == [("alpha", "alpha-class-0")]
        assert page["total"] == 3 and page["next_cursor"] == "alpha"
        assert registry.pending == 1  # gamma: beyond the page, still unread
        assert client.get("/tasks/gamma").json()["labels"][0] == "gamma-class-0"
        assert registry.pending == 0
