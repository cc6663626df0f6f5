"""The engine alone: the mixed-batch oracle, strategies, the merged-weights LRU, freeing tasks."""

from __future__ import annotations

import asyncio
import copy
import io
import json

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.engine import BatchItem, Engine
from app.main import create_app
from app.metrics import Metrics
from app.planner import Costs, Planner
from app.tasks import LoadedTask

AUTH = {"authorization": "Bearer s3cret"}
# Probabilities of one image computed two ways in float32 (grouped merged calls, the unmerged
# two-matmul form, timm's merged model) differ only by rounding in a different order of
# operations (~1e-7 relative per op through 4 random blocks); 1e-5 is far above that and far
# below any wrong-task or wrong-row error (those move probabilities by > 1e-2).
TOL = 1e-5


def _resident(registry, name: str) -> LoadedTask:  # noqa: ANN001
    """A task's resident version (tasks are only stored until their first request)."""
    return asyncio.run(registry.resident(name))


def _items(app, names: list[str], png, top_k: int = 10) -> list[BatchItem]:  # noqa: ANN001
    registry = app.state.service.registry
    out = []
    for i, name in enumerate(names):
        task = _resident(registry, name)
        out.append(BatchItem(task, task.transform(Image.open(io.BytesIO(png(i))).convert("RGB")), top_k))
    return out


def _run(engine: Engine, items: list[BatchItem]) -> list[list[tuple[int, float]]]:
    return asyncio.run(engine.run(items))


def _dist(prediction: list[tuple[int, float]]) -> dict[int, float]:
    return dict(prediction)


@pytest.mark.parametrize("strategy", ["auto", "merged", "segmented", "unmerged"])
def test_mixed_batch_equals_each_task_alone(make_settings, refs, png, strategy) -> None:
    app = create_app(make_settings(strategy=strategy))
    with TestClient(app):
        engine = app.state.service.engine
        names = [["alpha", "beta", "gamma"][i % 3] for i in range(9)]
        items = _items(app, names, png)
        mixed = _run(engine, items)
        for item, got in zip(items, mixed, strict=True):
            alone = _dist(_run(engine, [item])[0])
            assert _dist(got).keys() == alone.keys()
            for index, score in alone.items():
                assert _dist(got)[index] == pytest.approx(score, abs=1e-5)
        for i, (name, got) in enumerate(zip(names, mixed, strict=True)):  # and the directly merged model
            expected = refs[name].probs(png(i))
            assert [_dist(got)[c] for c in range(len(expected))] == pytest.approx(expected.tolist(), abs=1e-5)
        text = app.state.service.metrics.render().decode()
    if strategy == "auto":  # which form auto picks depends on the costs it measured on this machine
        assert any(f'rlrr_batches_total{{strategy="{name}"}}' in text
                   for name in ("merged", "segmented", "unmerged", "hybrid"))
    else:
        assert f'rlrr_batches_total{{strategy="{strategy}"}}' in text


def test_hybrid_batch_equals_each_task_merged(make_settings, refs, png) -> None:
    # One batch in two passes: cached tasks run segmented from their cached weights, an uncached one
    # unmerged (its just-in-time fold priced prohibitive). Every row must still equal its own
    # task's directly merged model.
    app = create_app(make_settings(strategy="auto"))
    with TestClient(app):
        engine = app.state.service.engine
        names = ["alpha", "beta", "gamma", "alpha", "alpha", "beta", "gamma"]
        items = _items(app, names, png)
        tasks = {name: _resident(app.state.service.registry, name) for name in ("alpha", "beta", "gamma")}
        keys = {name: task.key for name, task in tasks.items()}
        for name in ("alpha", "gamma"):
            engine.cache.put(keys[name], engine._fold(tasks[name]))
        engine.cache.admit_after = 1e9  # beta stays out of the cache
        engine.costs = Costs(segmented_row=1.0, segment=100.0, unmerged_row=2.0)
        plan = engine.planner.plan({keys[n]: names.count(n) for n in tasks}, {keys["alpha"], keys["gamma"]})
        assert plan == {keys["alpha"]: "segmented", keys["beta"]: "unmerged", keys["gamma"]: "segmented"}
        got = _run(engine, items)
        assert keys["beta"] not in engine.cache
        text = app.state.service.metrics.render().decode()
    assert 'rlrr_batches_total{strategy="hybrid"} 1.0' in text
    for i, (name, prediction) in enumerate(zip(names, got, strict=True)):
        expected = refs[name].probs(png(i))
        assert [_dist(prediction)[c] for c in range(len(expected))] == pytest.approx(expected.tolist(), abs=TOL)


def test_auto_plan_follows_the_costs() -> None:
    # The rule alone (no timing): one cached task runs as the plain model; otherwise every group
    # runs in one segmented pass while a just-in-time fold costs less than the rows' two-matmul
    # surcharge; a group whose fold costs more goes unmerged; a cached group never pays a fold.
    planner = Planner("auto")
    a, b, g = "a", "b", "g"
    counts = {a: 3, b: 1, g: 3}
    cpu = Costs(segmented_row=0.05, segmented_call=0.001, segment=0.003, unmerged_row=0.1, unmerged_call=0.001)
    planner.costs = cpu
    assert planner.plan({a: 4}, {a}) == {a: "merged"}
    assert planner.plan({a: 4}, set()) == {a: "segmented"}
    assert set(planner.plan(counts, set()).values()) == {"segmented"}
    planner.costs = Costs(**{**vars(cpu), "segment": 0.12})  # a fold dearer than 2 rows' surcharge (0.1), not 3 rows'
    assert planner.plan(counts, set()) == {a: "segmented", b: "unmerged", g: "segmented"}
    assert planner.plan(counts, {b}) == {a: "segmented", b: "segmented", g: "segmented"}  # cached: no fold
    planner.costs = Costs(**{**vars(cpu), "segment": 10.0})
    assert set(planner.plan(counts, set()).values()) == {"unmerged"}
    assert set(planner.plan(counts, set(), force="segmented").values()) == {"segmented"}  # forcing wins
    assert set(Planner("merged").plan(counts, set()).values()) == {"merged"}
    with pytest.raises(ValueError, match="strategy must be"):
        Planner("fastest")


def test_auto_plan_prices_tasks_without_a_rescale_at_one_gemm() -> None:
    # LoRA / BitFit rows need no second GEMM in the unmerged pass (shared base GEMM + shrink/expand):
    # with a fold dearer than one row, a LoRA group goes unmerged while an RLRR group of the same size
    # stays segmented; and a pass holding a rescaling task prices all its rows at the two-GEMM rate.
    planner = Planner("auto")
    planner.costs = Costs(segmented_row=0.05, segmented_call=0.0, segment=0.02, unmerged_row=0.1,
                          unmerged_call=0.0, plain_row=0.052)
    counts = {"lora": 2, "rlrr": 2}
    assert planner.plan(counts, set(), plain={"lora"}) == {"lora": "unmerged", "rlrr": "segmented"}
    assert set(planner.plan(counts, set()).values()) == {"segmented"}  # nothing plain: as before
    mixed = planner.cost({"lora": "unmerged", "rlrr": "unmerged"}, counts, set(), {"lora"})
    assert mixed == pytest.approx(4 * 0.1)


def test_warm_up_measures_the_costs(client) -> None:
    engine = client.app.state.service.engine
    costs = vars(engine.costs)
    assert all(value >= 0 for value in costs.values()) and engine.costs.merged_row > 0
    assert engine.costs.segment > 0  # a group's cost in a pass: timed with clones of the warm task ...
    assert not any("#segment-" in name for name in engine.multi.task_names)  # ... that never join the table
    text = client.app.state.service.metrics.render().decode()
    for name in costs:
        assert f'rlrr_auto_cost_seconds{{kind="{name}"}}' in text


def test_merged_cache_is_bounded_by_bytes(make_settings, png) -> None:
    probe = create_app(make_settings())
    with TestClient(probe):
        folded = probe.state.service.engine._fold(_resident(probe.state.service.registry, "alpha"))
        one = sum(t.numel() * t.element_size() for t in folded.values())  # every task: the same size
    app = create_app(make_settings(strategy="merged", merged_cache_bytes=int(one * 1.5), warmup=False))
    with TestClient(app):
        engine = app.state.service.engine  # room for exactly one task
        for name in ["alpha", "beta", "alpha", "gamma", "gamma"]:
            _run(engine, _items(app, [name], png))
            assert engine.cache.nbytes <= engine.cache.max_bytes
            assert len(engine.cache) == 1
        text = app.state.service.metrics.render().decode()
    evictions = [line for line in text.splitlines() if line.startswith("rlrr_merged_cache_evictions_total ")]
    assert float(evictions[0].split()[1]) == 3  # beta, then alpha, then gamma displace the one entry
    assert "rlrr_merged_cache_hits_total 1.0" in text and "rlrr_merged_cache_misses_total 4.0" in text


def test_zero_cache_folds_on_the_fly(make_settings, refs, png) -> None:
    app = create_app(make_settings(merged_cache_bytes=0))
    with TestClient(app):
        engine = app.state.service.engine
        got = _dist(_run(engine, _items(app, ["gamma"], png))[0])
        assert len(engine.cache) == 0 and engine.cache.nbytes == 0
    expected = refs["gamma"].probs(png(0))
    assert [got[c] for c in range(7)] == pytest.approx(expected.tolist(), abs=1e-5)


def test_replaced_and_deleted_tasks_are_freed(client, make_upload) -> None:
    app = client.app
    engine, registry = app.state.service.engine, app.state.service.registry
    old_alpha, old_beta = _resident(registry, "alpha").key, _resident(registry, "beta").key
    directory = make_upload()
    files = {name: (name, (directory / f).read_bytes()) for name, f in
             [("config", "adapter_config.json"), ("weights", "adapter_model.safetensors")]}
    assert client.put("/tasks/alpha", files=files, headers=AUTH).status_code == 200
    assert client.delete("/tasks/beta", headers=AUTH).status_code == 204
    assert old_alpha not in engine.multi.task_names and old_alpha not in engine.cache
    assert old_beta not in engine.multi.task_names and old_beta not in engine.cache
    assert _resident(registry, "alpha").key in engine.multi.task_names
    assert sorted(engine.multi.task_names) == sorted(t.key for t in registry.tasks.values())


def test_a_retired_version_still_in_the_queue_is_served_then_freed(client, png) -> None:
    app = client.app
    engine, registry = app.state.service.engine, app.state.service.registry
    items = _items(app, ["alpha", "gamma"], png)  # admitted before the delete
    before = _run(engine, items)
    assert client.delete("/tasks/gamma", headers=AUTH).status_code == 204
    after = _run(engine, items)
    for b, a in zip(before, after, strict=True):
        assert _dist(a) == pytest.approx(_dist(b), abs=1e-5)
    assert items[1].task.key not in engine.multi.task_names and items[1].task.key not in engine.cache
    assert "gamma" not in registry.tasks


def test_cpu_runs_float32(client) -> None:
    engine = client.app.state.service.engine
    assert engine.device == torch.device("cpu") and engine.dtype == torch.float32


def test_half_precision_path_agrees_with_float32(make_settings, png) -> None:
    # The CUDA dtype path (bf16 backbone, fp32-folded then cast weights), exercised on CPU.
    app = create_app(make_settings())
    with TestClient(app):
        fp32 = app.state.service.engine
        items = _items(app, ["alpha", "beta", "gamma", "alpha"], png)
        want = _run(fp32, items)
        backbone = copy.deepcopy(fp32.backbone).to(torch.bfloat16)
        half = Engine(backbone, name="test_vit", fingerprint=fp32.fingerprint, random_weights=False,
                      strategy="auto", cache_bytes=2**30, metrics=Metrics())
        try:
            for task in {item.task.key: item.task for item in items}.values():
                asyncio.run(half.prepare(task))
            mixed, single = _run(half, items), [_run(half, [item])[0] for item in items]
        finally:
            half.close()
        assert fp32.dtype == torch.float32  # the served engine was untouched
    for w, m, s in zip(want, mixed, single, strict=True):
        for got in (m, s):
            assert _dist(got).keys() == _dist(w).keys()
            assert [_dist(got)[k] for k in _dist(w)] == pytest.approx(list(_dist(w).values()), abs=0.05)


def test_loading_and_serving_fold_nothing(make_settings, refs, png, monkeypatch) -> None:
    # Validating a task is a bound check, not a fold of the backbone; a task seen once is served by
    # a just-in-time fold per layer (segmented), not by folding it whole into the cache.
    import app.engine

    def no_fold(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a whole-backbone fold happened")

    monkeypatch.setattr(app.engine, "fold_adapter", no_fold)
    application = create_app(make_settings(warmup=False))
    with TestClient(application):
        assert sorted(application.state.service.registry.names()) == ["alpha", "beta", "gamma"]
        got = _dist(_run(application.state.service.engine, _items(application, ["beta"], png))[0])
    expected = refs["beta"].probs(png(0))
    assert [got[c] for c in range(len(expected))] == pytest.approx(expected.tolist(), abs=TOL)


def test_an_adapter_with_a_huge_value_is_refused_at_upload(client, make_upload, png) -> None:
    # Finding 4 of the hostile test: 1e30 used to be accepted and then answered `"score": null`.
    import json

    from safetensors.torch import load_file

    from adapters import RLRRConfig, save_adapter

    directory = make_upload()
    doc = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    tensors["blocks.0.mlp.fc2.rlrr_l"][3] = 1e30
    bad = save_adapter(tensors, directory.parent / "huge", base_model=doc["base_model"],
                       config=RLRRConfig.from_dict(doc["rlrr_config"]), fingerprint=doc["backbone_fingerprint"],
                       num_classes=doc["num_classes"], labels=doc["labels"])
    files = {name: (name, (bad / f).read_bytes()) for name, f in
             [("config", "adapter_config.json"), ("weights", "adapter_model.safetensors")]}
    response = client.put("/tasks/huge", files=files, headers=AUTH)
    assert response.status_code == 422
    assert "blocks.0.mlp.fc2.rlrr_l" in str(response.json()["detail"]) and "1e+30" in str(response.json()["detail"])
    assert client.get("/tasks/huge").status_code == 404
    assert not (client.app.state.service.registry.store / "huge").exists()


def test_an_upload_does_not_wait_for_the_engine_thread(client, make_upload) -> None:
    # Validation (prepare and the finite-logits probe) runs beside the engine thread: with the engine
    # thread held by a "batch" that never ends on its own, an upload still completes. On the engine
    # thread the probe queued behind the running batch (a 5.6 s PUT on 2 cores, bench/serve.py).
    import threading

    engine = client.app.state.service.engine
    release, started = threading.Event(), threading.Event()

    def long_batch() -> None:
        started.set()
        release.wait(timeout=60)

    busy = engine._executor.submit(long_batch)
    try:
        assert started.wait(timeout=10)
        directory = make_upload(classes=3, seed=11)
        files = {name: (name, (directory / f).read_bytes()) for name, f in
                 [("config", "adapter_config.json"), ("weights", "adapter_model.safetensors")]}
        response = client.put("/tasks/uploaded-meanwhile", files=files, headers=AUTH)
        assert response.status_code == 200, response.text
        assert not busy.done(), "the upload finished only because the engine thread was free"
    finally:
        release.set()
        busy.result(timeout=60)
    assert client.get("/tasks/uploaded-meanwhile").status_code == 200


def test_only_tasks_that_fill_a_batch_are_folded_into_the_cache(make_settings, png) -> None:
    # Mixed batches run segmented (a just-in-time fold is cheaper than an admission); a task that
    # holds half a batch or more, batch after batch, earns a cached fold and then runs as one plain forward.
    app = create_app(make_settings(warmup=False))
    with TestClient(app):
        engine = app.state.service.engine
        for _ in range(4):
            _run(engine, _items(app, ["alpha", "beta", "gamma"], png))
        assert len(engine.cache) == 0
        for _ in range(3):
            _run(engine, _items(app, ["alpha", "alpha", "beta"], png))
        assert _resident(app.state.service.registry, "alpha").key in engine.cache
        assert _resident(app.state.service.registry, "beta").key not in engine.cache
        text = app.state.service.metrics.render().decode()
    assert 'rlrr_batches_total{strategy="segmented"} 7.0' in text


def test_costs_file_measured_once_then_read_back(make_settings, tmp_path) -> None:
    # The first start measures and writes; a second start of the same backbone reads the same costs
    # back instead of timing the forms again; a corrupt file is a miss (measure again), never an error.
    path = tmp_path / "cache" / "plan-costs.json"
    app = create_app(make_settings(costs_file=path))
    with TestClient(app):
        first = app.state.service.engine
        assert first.costs_source == "measured"
        measured = vars(first.costs).copy()
    doc = json.loads(path.read_text())
    (key, entry), = doc.items()
    assert first.fingerprint in key and entry["costs"] == measured and entry["kinds"]
    again = create_app(make_settings(costs_file=path))
    with TestClient(again):
        assert again.state.service.engine.costs_source == "file"
        assert vars(again.state.service.engine.costs) == measured
        text = again.state.service.metrics.render().decode()
    assert f'rlrr_auto_cost_seconds{{kind="segmented_row"}} {measured["segmented_row"]!r}' in text
    path.write_text("{not json")
    broken = create_app(make_settings(costs_file=path))
    with TestClient(broken):
        assert broken.state.service.engine.costs_source == "measured"
    assert json.loads(path.read_text())[key]["kinds"] == entry["kinds"]  # rewritten whole
    assert not list(path.parent.glob(".plan-costs-*"))  # no temp file left behind


def test_costs_file_off_and_other_backbones_measure(make_settings, tmp_path) -> None:
    # A key holds the backbone's fingerprint: another backbone's (or another dtype's) entry is not used.
    path = tmp_path / "plan-costs.json"
    path.write_text(json.dumps({"v1|other-fingerprint|cpu|float32|threads=1|torch=x|batch=4": {
        "costs": vars(Costs()), "kinds": ["plain", "rescaling"]}}))
    app = create_app(make_settings(costs_file=path))
    with TestClient(app):
        assert app.state.service.engine.costs_source == "measured"
    assert len(json.loads(path.read_text())) == 2  # the other key is kept beside this one
    assert make_settings(costs_file="off").costs_file is None
