import copy

import pytest
import timm
import torch

from adapters import RLRRConfig, adapter_state_dict, add_rlrr, fold_adapter, merge_rlrr
from adapters.layers import FORWARD_MODES, RLRRLinear, SSFLayer, set_forward_mode

# fp32 folding reorders the sums of each matmul; observed max |merged - unmerged| is ~3e-7 on
# these models' logits (O(1) values). 1e-4 leaves a wide margin and still catches any real error
# (a missing l, c, s, γ or β moves logits by > 1e-2 with the perturbation used here).
MERGE_ATOL = 1e-4

MODELS = [
    ("test_vit", {}),
    ("vit_tiny_patch16_224", {"img_size": 64}),
    ("deit_tiny_patch16_224", {"img_size": 64}),
    ("vit_small_patch16_224", {"img_size": 64, "depth": 3}),
    ("vit_tiny_patch16_224", {"img_size": 64, "global_pool": "avg", "fc_norm": True}),
]
VARIANTS = [
    RLRRConfig(),
    RLRRConfig(left=False),
    RLRRConfig(right=False),
    RLRRConfig(residual=False),
    RLRRConfig(split_qkv=False),
    RLRRConfig.preset("ssf"),
    RLRRConfig.preset("linear"),
]


def images(model: torch.nn.Module, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("mode", FORWARD_MODES)
@pytest.mark.parametrize(("name", "kwargs"), MODELS)
@torch.no_grad()
def test_merged_equals_unmerged(name: str, kwargs: dict, mode: str, make_vit, perturb) -> None:
    model = set_forward_mode(perturb(add_rlrr(make_vit(name, **kwargs), RLRRConfig(), 6)), mode)
    before = copy.deepcopy(model.state_dict())
    merged = merge_rlrr(model).eval()
    x = images(model)
    unmerged = model(x)
    max_diff = (merged(x) - unmerged).abs().max().item()
    assert max_diff < MERGE_ATOL
    # Non-trivial: the adapter really changes the output compared with the zero-adapter model.
    assert unmerged.abs().max() > 1e-2
    # The input is untouched and still wrapped.
    assert isinstance(model.blocks[0].attn.qkv, RLRRLinear)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("mode", FORWARD_MODES)
@pytest.mark.parametrize("config", VARIANTS, ids=lambda c: str(c.to_dict()))
@torch.no_grad()
def test_every_variant_merges_exactly(config: RLRRConfig, mode: str, make_vit, perturb) -> None:
    model = set_forward_mode(perturb(add_rlrr(make_vit(), config, 4)), mode)
    x = images(model)
    assert (merge_rlrr(model).eval()(x) - model(x)).abs().max() < MERGE_ATOL


def test_merged_model_is_a_plain_timm_model(make_vit, perturb) -> None:
    model = perturb(add_rlrr(make_vit(), RLRRConfig(), 6))
    merged = merge_rlrr(model)
    assert not any(isinstance(m, (RLRRLinear, SSFLayer)) for m in merged.modules())
    assert not hasattr(merged, "rlrr_config")
    fresh = timm.create_model("test_vit", pretrained=False, num_classes=6)
    fresh.load_state_dict(merged.state_dict(), strict=True)  # same keys and shapes as stock timm


@torch.no_grad()
def test_merged_weight_is_rank_one_rescaling_per_qkv_slice(make_vit, perturb) -> None:
    model = perturb(add_rlrr(make_vit(), RLRRConfig(), 3))
    qkv = model.blocks[1].attn.qkv
    w = qkv.base_layer.weight.double()
    w_merged = merge_rlrr(model).blocks[1].attn.qkv.weight.double()
    ratio = w_merged / w - 1  # (3·dim, dim) = l cᵀ, one c per slice
    dim = w.shape[1]
    for j in range(3):
        rows = slice(j * dim, (j + 1) * dim)
        expected = torch.outer(qkv.rlrr_l[rows].double(), qkv.rlrr_c[j].double())
        # fp32 weights: the ratio of two fp32 numbers carries ~1e-7 relative error, amplified
        # where |W| is tiny; compare where W is not near zero.
        mask = w[rows].abs() > 1e-3
        torch.testing.assert_close(ratio[rows][mask], expected[mask], rtol=1e-3, atol=1e-3)
        assert torch.linalg.matrix_rank(ratio[rows].float(), atol=1e-3) == 1
    b_merged = merge_rlrr(model).blocks[1].attn.qkv.bias
    torch.testing.assert_close(b_merged, qkv.base_layer.bias + qkv.rlrr_s)


@torch.no_grad()
def test_fold_adapter_runs_functionally_on_the_pristine_backbone(make_vit, perturb) -> None:
    base = make_vit()
    pristine = copy.deepcopy(base.state_dict())
    model = perturb(add_rlrr(copy.deepcopy(base), RLRRConfig(), 5))
    folded = fold_adapter(base, adapter_state_dict(model), model.rlrr_config)
    x = images(base)
    out = torch.func.functional_call(base, folded, (x,))
    assert (out - model(x)).abs().max() < MERGE_ATOL
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in pristine.items())


def test_fold_refuses_missing_and_non_finite_tensors(make_vit, perturb) -> None:
    fold = fold_adapter
    model = perturb(add_rlrr(make_vit(), RLRRConfig(), 5))
    tensors = adapter_state_dict(model)
    broken = dict(tensors)
    del broken["blocks.0.mlp.fc1.rlrr_l"]
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1.rlrr_l' is missing"):
        fold(model, broken, model.rlrr_config)
    tensors["blocks.0.mlp.fc1.rlrr_c"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        fold(model, tensors, model.rlrr_config)


def test_merge_needs_an_adapter(make_vit) -> None:
    with pytest.raises(ValueError, match="add_rlrr was not called"):
        merge_rlrr(make_vit())


def test_fold_and_unmerged_forward_give_the_same_gradients(make_vit, perturb) -> None:
    # The trainer uses the fold form; its gradients must be those of the method's unmerged form.
    x = images(make_vit())
    grads = {}
    for mode in FORWARD_MODES:
        torch.manual_seed(0)
        model = set_forward_mode(perturb(add_rlrr(make_vit(), RLRRConfig(), 4)), mode)
        model(x).square().sum().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["fold"].keys() == grads["unmerged"].keys() and len(grads["fold"]) > 0
    for n, g in grads["fold"].items():
        # fp32 reassociation only; gradients are O(1)-O(10) here.
        assert torch.allclose(g, grads["unmerged"][n], rtol=1e-4, atol=1e-5), n


def test_forward_mode_is_validated(make_vit) -> None:
    with pytest.raises(ValueError, match="forward mode"):
        set_forward_mode(add_rlrr(make_vit(), RLRRConfig(), 4), "sideways")
