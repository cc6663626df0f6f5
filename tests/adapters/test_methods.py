"""Every method on one engine: exact folds, and mixed-method batches equal to each task alone."""
import copy

import pytest
import torch

from adapters import (
    BitFitConfig,
    IA3Config,
    LoRAConfig,
    MultiTaskViT,
    RLRRConfig,
    adapter_forms,
    adapter_state_dict,
    add_adapter,
    check_bounds,
    fold_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    weight_bounds,
)
from adapters.errors import AdapterConfigError, AdapterValueError

# Mixed-batch rows run the same fp32 ops as the task alone up to summation order and fold rounding
# (~1e-6 observed on test_vit); peft's own oracle tolerance is 1e-5.
ORACLE_ATOL = 1e-5

# One task per method (and two LoRA variants: the patch conv through PEFT's suffix rule, rsLoRA).
TASKS = {
    "rlrr": (RLRRConfig(), 5),
    "lora": (LoRAConfig(target_modules=("qkv", "proj", "fc1", "fc2"), r=4, lora_alpha=8), 4),
    "ia3": (IA3Config(target_modules=("qkv", "fc2", "patch_embed.proj"), feedforward_modules=("fc2",)), 3),
    "bitfit": (BitFitConfig(), 6),
    "ssf": (RLRRConfig.preset("ssf"), 2),
    "lora_rs": (LoRAConfig(target_modules=("attn.qkv",), r=2, lora_alpha=3, use_rslora=True), 3),
    "linear": (RLRRConfig.preset("linear"), 7),
}


@pytest.fixture(scope="module")
def setup():
    import timm

    torch.manual_seed(0)
    base = timm.create_model("test_vit", pretrained=False).eval()
    pristine = copy.deepcopy(base.state_dict())
    models = {}
    for i, (name, (cfg, classes)) in enumerate(TASKS.items()):
        model = add_adapter(copy.deepcopy(base), cfg, classes)
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():  # away from the init: LoRA's B ≠ 0, IA³'s vectors ≠ 1, BitFit's shifts ≠ 0
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
        models[name] = model.eval()
    multi = MultiTaskViT(base)
    handles = {n: multi.add_task(n, adapter_state_dict(m), m.rlrr_config, m.head.out_features)
               for n, m in models.items()}
    return base, pristine, models, multi, handles


@torch.no_grad()
@pytest.mark.parametrize("name", list(TASKS))
def test_merged_equals_unmerged(setup, name) -> None:
    # The fold is exact: the plain merged timm model equals the wrapped (training) model.
    _, _, models, _, _ = setup
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    wrapped = models[name](x)
    merged = merge_adapter(models[name]).eval()(x)
    assert (wrapped - merged).abs().max() < ORACLE_ATOL
    assert "rlrr_config" not in vars(merge_adapter(models[name]))


FORMS = ["unmerged", "unmerged-one-sided", "segmented", "segmented+cache", "handles"]


@torch.no_grad()
@pytest.mark.parametrize("form", FORMS)
def test_mixed_method_batch_equals_each_task_alone(setup, form) -> None:
    # Rows cycle every method (peft's [base, a, b][i % 3] pattern, widened): each row is its task's model.
    base, pristine, models, multi, handles = setup
    names = list(TASKS)
    if form == "unmerged-one-sided":  # no two-sided l cᵀ in the batch: IA³ rows scale around ONE shared GEMM
        names = [n for n in names if n != "rlrr"]
        assert not any(handles[n].rescaled for n in names)
        assert handles["ia3"].scaled_out and handles["ia3"].scaled_in
    x = torch.randn(2 * len(names) + 1, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    rows = [names[i % len(names)] for i in range(len(x))]
    if form.startswith("unmerged"):
        logits = multi(x, rows, mode="unmerged")
    elif form == "segmented":
        logits = multi(x, rows, mode="segmented")
    elif form == "segmented+cache":  # some tasks from the caller's merged cache, the rest folded just in time
        cache = {n: fold_adapter(base, adapter_state_dict(models[n]), models[n].rlrr_config) for n in ("lora", "ia3")}
        logits = multi(x, rows, mode="segmented", merged=cache)
    else:  # handles: what the engine passes; unaffected by a later remove
        logits = multi(x, [handles[n] for n in rows], mode="segmented")
    for name in names:
        sel = [i for i, r in enumerate(rows) if r == name]
        alone = merge_adapter(models[name]).eval()(x[sel])
        c = alone.shape[1]
        assert (logits[sel, :c] - alone).abs().max() < ORACLE_ATOL, name
        assert torch.isinf(logits[sel, c:]).all()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in pristine.items()), "backbone changed"


@torch.no_grad()
def test_tasks_of_each_method_really_differ_from_the_backbone(setup) -> None:
    # An oracle that passes because every method is a no-op would be worthless: each changes the features.
    base, _, models, multi, _ = setup
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(8))
    plain = base.forward_head(base.forward_features(x), pre_logits=True)
    for name in ("rlrr", "lora", "ia3", "bitfit", "ssf", "lora_rs"):
        m = merge_adapter(models[name]).eval()
        assert (m.forward_head(m.forward_features(x), pre_logits=True) - plain).abs().max() > 1e-3, name


@torch.no_grad()
def test_a_removed_task_still_runs_from_its_handle(setup) -> None:
    base, _, models, _, _ = setup
    multi = MultiTaskViT(base)
    m = models["lora"]
    handle = multi.add_task("lora", adapter_state_dict(m), m.rlrr_config, m.head.out_features)
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(9))
    before = multi(x, [handle, handle], mode="segmented")
    multi.remove_task("lora")
    assert not multi.has_task("lora")
    torch.testing.assert_close(multi(x, [handle, handle], mode="segmented"), before, atol=0, rtol=0)


def test_every_method_round_trips_through_the_folder(setup, tmp_path) -> None:
    base, _, models, _, _ = setup
    for name in ("lora", "ia3", "bitfit"):
        m = models[name]
        save_adapter(m, tmp_path / name, base_model="test_vit")
        loaded = load_adapter(tmp_path / name, backbone=base)
        assert loaded.config == m.rlrr_config and loaded.method == name
        for k, v in adapter_state_dict(m).items():
            assert torch.equal(loaded.tensors[k], v), k


def test_bounds_cover_every_method(setup) -> None:
    # A LoRA update that would overflow fp16 is refused by name; the trained one passes.
    base, _, models, _, _ = setup
    bounds = weight_bounds(base)
    for name in ("lora", "ia3", "bitfit"):
        m = models[name]
        forms, tensors = adapter_forms(base, adapter_state_dict(m), m.rlrr_config)
        check_bounds(tensors, m.rlrr_config, bounds, torch.float16, forms=forms)
    m = models["lora"]
    tensors = adapter_state_dict(m)
    key = "blocks.0.attn.qkv.lora_B"
    tensors[key] = torch.full_like(tensors[key], 9e3)
    tensors["blocks.0.attn.qkv.lora_A"] = torch.full_like(tensors["blocks.0.attn.qkv.lora_A"], 9e3)
    forms, full = adapter_forms(base, tensors, m.rlrr_config)
    with pytest.raises(AdapterValueError, match="blocks.0.attn.qkv"):
        check_bounds(full, m.rlrr_config, bounds, torch.float16, forms=forms)


def test_target_modules_that_match_nothing_or_the_head_are_refused(setup) -> None:
    base = setup[0]
    with pytest.raises(AdapterConfigError, match="target_modules: 'query' matches no module"):
        add_adapter(copy.deepcopy(base), LoRAConfig(target_modules=("query",)), 2)
    with pytest.raises(AdapterConfigError, match="'head' matches"):
        add_adapter(copy.deepcopy(base), LoRAConfig(target_modules=("head",)), 2)
    with pytest.raises(AdapterConfigError, match="not in target_modules"):
        add_adapter(copy.deepcopy(base), IA3Config(target_modules=("qkv",), feedforward_modules=("fc2",)), 2)
