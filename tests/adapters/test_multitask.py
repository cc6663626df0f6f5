import copy
import threading

import pytest
import torch

from adapters import MultiTaskViT, RLRRConfig, adapter_state_dict, add_rlrr, fold_adapter, merge_rlrr

# Mixed-batch rows run the same fp32 ops as the unmerged single-task model, and differ from
# the merged model only by fold rounding (~3e-7 observed); peft's oracle uses 1e-5.
ORACLE_ATOL = 1e-5

# Three tasks of different configs and class counts share one batch.
TASKS = {
    "rlrr": (RLRRConfig(), 5),
    "no_residual": (RLRRConfig(residual=False), 4),
    "ssf": (RLRRConfig.preset("ssf"), 3),
    "left_only_no_split": (RLRRConfig(right=False, split_qkv=False), 7),
    "linear": (RLRRConfig.preset("linear"), 2),
}


@pytest.fixture
def setup(make_vit, perturb):
    base = make_vit()
    pristine = copy.deepcopy(base.state_dict())
    models = {n: perturb(add_rlrr(copy.deepcopy(base), cfg, c), seed=i)
              for i, (n, (cfg, c)) in enumerate(TASKS.items())}
    mt = MultiTaskViT(base)
    for n, m in models.items():
        mt.add_task(n, adapter_state_dict(m), m.rlrr_config, m.head.out_features)
    return base, pristine, models, mt


MODES = ["unmerged", "segmented"]


@torch.no_grad()
@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_equals_each_task_alone(setup, mode) -> None:
    # Rows interleave the tasks, so segmented mode must sort them into segments and back.
    base, pristine, models, mt = setup
    names = ["rlrr", "ssf", "linear", "left_only_no_split", "no_residual"]
    x = torch.randn(11, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    rows = [names[i % len(names)] for i in range(len(x))]
    ids = torch.tensor([mt.task_index(n) for n in rows])
    logits = mt(x, ids, mode=mode)
    assert logits.shape == (11, max(c for _, c in TASKS.values()))
    for name in names:
        sel = [i for i, r in enumerate(rows) if r == name]
        alone = merge_rlrr(models[name]).eval()(x[sel])
        c = alone.shape[1]
        assert (logits[sel, :c] - alone).abs().max() < ORACLE_ATOL, name
        assert torch.isinf(logits[sel, c:]).all()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in pristine.items()), "backbone changed"


@torch.no_grad()
def test_segmented_uses_cached_weights_and_sorted_rows_as_is(setup) -> None:
    # A task whose folded weights the caller passes is computed from them, not re-folded: a cache
    # entry that differs from the adapter must show in that task's rows (and only there).
    base, _, models, mt = setup
    x = torch.randn(6, 3, 160, 160, generator=torch.Generator().manual_seed(4))
    rows = ["rlrr", "rlrr", "rlrr", "ssf", "ssf", "no_residual"]  # already sorted by task index
    plain = mt(x, rows, mode="segmented")
    folded = fold_adapter(base, adapter_state_dict(models["rlrr"]), models["rlrr"].rlrr_config)
    cached = mt(x, rows, mode="segmented", merged={"rlrr": folded})
    torch.testing.assert_close(cached, plain, atol=ORACLE_ATOL, rtol=0)
    wrong = {**folded, "blocks.0.mlp.fc1.weight": torch.zeros_like(folded["blocks.0.mlp.fc1.weight"])}
    changed = mt(x, rows, mode="segmented", merged={"rlrr": wrong})
    assert (changed[:3, :5] - plain[:3, :5]).abs().max() > 1e-3
    torch.testing.assert_close(changed[3:], plain[3:], atol=0, rtol=0)
    with pytest.raises(ValueError, match="mode must be"):
        mt(x, rows, mode="fused")


@torch.no_grad()
def test_tasks_really_differ(setup) -> None:
    _, _, _, mt = setup
    x = torch.randn(1, 3, 160, 160).expand(2, -1, -1, -1)
    out = mt(x, torch.tensor([mt.task_index("rlrr"), mt.task_index("ssf")]))
    assert not torch.allclose(out[0, :3], out[1, :3])


@torch.no_grad()
def test_add_replace_remove(setup) -> None:
    base, _, models, mt = setup
    x = torch.randn(2, 3, 160, 160)
    before = mt(x, torch.full((2,), mt.task_index("ssf")))
    mt.remove_task("rlrr")
    assert "rlrr" not in mt.task_names
    after = mt(x, torch.full((2,), mt.task_index("ssf")))
    torch.testing.assert_close(before[:, :3], after[:, :3], atol=ORACLE_ATOL, rtol=0)
    with pytest.raises(KeyError, match="unknown task 'rlrr'"):
        mt.task_index("rlrr")
    with pytest.raises(ValueError, match="task_ids must hold"):
        mt(x, torch.tensor([0, 99]))
    with pytest.raises(KeyError, match="unknown tasks \\['rlrr'\\]"):
        mt(x, ["ssf", "rlrr"])
    by_name = mt(x, ["ssf", "ssf"])
    torch.testing.assert_close(by_name[:, :3], after[:, :3], atol=0, rtol=0)


def test_shape_mismatch_is_refused(setup, make_vit) -> None:
    _, _, _, mt = setup
    other = add_rlrr(make_vit("test_vit2"), RLRRConfig(), 3)
    with pytest.raises(ValueError, match="expected shape"):
        mt.add_task("other", adapter_state_dict(other), other.rlrr_config, 3)


@torch.no_grad()
def test_forward_is_consistent_while_tasks_change(setup) -> None:
    _, _, models, mt = setup
    x = torch.randn(3, 3, 160, 160)
    ids = torch.full((3,), mt.task_index("linear"))
    expected = mt(x, ids)
    errors: list[Exception] = []
    m = models["ssf"]
    tensors = adapter_state_dict(m)

    def churn() -> None:
        try:
            for i in range(5):
                mt.add_task(f"extra{i}", tensors, m.rlrr_config, 3)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    for _ in range(3):
        got = mt(x, torch.full((3,), mt.task_index("linear")))
        torch.testing.assert_close(got[:, :2], expected[:, :2], atol=ORACLE_ATOL, rtol=0)
    t.join()
    assert not errors


@torch.no_grad()
def test_same_config_tasks_share_one_layout_and_match_alone(make_vit, perturb, tmp_path) -> None:
    # The usual server case: tasks loaded from disk with one config. Their PackedTensors share a
    # layout and the plan, so a batch reads every layer as a view of their stacked buffers; rows
    # [a, b, c][i % 3] must still equal each task's own merged model (peft's mixed-batch oracle).
    from adapters import load_adapter, save_adapter

    base = make_vit()
    models, mt = {}, MultiTaskViT(base)
    for i, (name, classes) in enumerate((("a", 3), ("b", 5), ("c", 4))):
        models[name] = perturb(add_rlrr(copy.deepcopy(base), RLRRConfig(), classes), seed=10 + i)
        adapter = load_adapter(save_adapter(models[name], tmp_path / name, base_model="test_vit"), backbone=base)
        mt.add_task(name, adapter.tensors, adapter.config, adapter.num_classes)
        assert mt._tasks[name].source is adapter.tensors  # CPU float32: kept as is, not copied
    a, b, c = (mt._tasks[n] for n in "abc")
    assert a.source.layout is b.source.layout is c.source.layout and a.plan is b.plan is c.plan
    x = torch.randn(9, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    rows = ["abc"[i % 3] for i in range(len(x))]
    for mode in MODES:
        logits = mt(x, rows, mode=mode)
        for name, model in models.items():
            sel = [i for i, r in enumerate(rows) if r == name]
            alone = merge_rlrr(model).eval()(x[sel])
            assert (logits[sel, : alone.shape[1]] - alone).abs().max() < ORACLE_ATOL, (mode, name)
