import copy
import math

import pytest
import timm
import torch
import torch.nn as nn

from adapters import RLRRConfig, adapter_state_dict, add_rlrr, backbone_fingerprint
from adapters.layers import RLRRLinear, SSFLayer

MODELS = [
    ("test_vit", {}),
    ("vit_tiny_patch16_224", {"img_size": 64}),
    ("deit_tiny_patch16_224", {"img_size": 64}),
    ("vit_small_patch16_224", {"img_size": 64, "depth": 2}),
]

# ViT-B/16 dims, to count by hand what each variant must hold.
D, HID, DEPTH = 768, 3072, 12


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def vit_b_count(left: bool = True, right: bool = True, shift: bool = True, split: bool = True,
                ssf: bool = True) -> int:
    """Adapter parameters of ViT-B/16, counted from the layer dims (out, in) of each linear."""
    linears = [(3 * D, D), (D, D), (HID, D), (D, HID)]  # qkv, proj, fc1, fc2
    per_block = 0
    for i, (out_f, in_f) in enumerate(linears):
        groups = 3 if (i == 0 and split) else 1
        per_block += left * out_f + right * groups * in_f + shift * out_f
    per_block += ssf * 2 * 2 * D  # norm1, norm2: scale + shift
    return DEPTH * per_block + ssf * 2 * 2 * D  # patch embedding and final norm


@pytest.mark.parametrize("num_classes", [10, 100])
def test_vit_base_count_matches_the_paper(num_classes: int) -> None:
    model = add_rlrr(timm.create_model("vit_base_patch16_224", pretrained=False), RLRRConfig(), num_classes)
    assert trainable(model) == 288_768 + 769 * num_classes
    assert vit_b_count() == 288_768  # the hand count agrees with the brief, so the ablations below are trusted


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (RLRRConfig(left=False), vit_b_count(left=False)),
        (RLRRConfig(right=False), vit_b_count(right=False)),
        (RLRRConfig(residual=False), vit_b_count()),
        (RLRRConfig(bias_shift=False), vit_b_count(shift=False)),
        (RLRRConfig(split_qkv=False), vit_b_count(split=False)),
        (RLRRConfig(ssf_targets=()), vit_b_count(ssf=False)),
        (RLRRConfig.preset("ssf"), vit_b_count(right=False)),
        (RLRRConfig.preset("linear"), 0),
    ],
)
def test_ablation_counts(config: RLRRConfig, expected: int) -> None:
    model = add_rlrr(timm.create_model("vit_base_patch16_224", pretrained=False), config, 10)
    assert trainable(model) == expected + 769 * 10


@pytest.mark.parametrize(("name", "kwargs"), MODELS)
def test_only_adapter_and_head_train(name: str, kwargs: dict, make_vit, perturb) -> None:
    # The reference head starts at zero, which blocks every gradient below it: perturb first.
    model = perturb(add_rlrr(make_vit(name, **kwargs), RLRRConfig(), 5)).train()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k or
                     not any(t in k for t in ("rlrr_", "ssf_", "head."))}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    size = model.patch_embed.img_size
    loss = model(torch.randn(2, 3, *size)).logsumexp(-1).mean()
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == expected
    assert all(n.startswith("head.") or n.rsplit(".", 1)[-1].startswith(("rlrr_", "ssf_")) for n in expected)
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items()), "a backbone tensor changed"


def test_reference_init_matches_the_reference_code(make_vit) -> None:
    model = add_rlrr(make_vit(), RLRRConfig(), 3)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, RLRRLinear) and qkv.rlrr_c.shape == (3, 64)
    bound_c = math.sqrt(6 / 64)  # kaiming-uniform (a = 0) with fan_in = in; ViT-B sizes: test_layers.py
    assert qkv.rlrr_c.abs().max() <= bound_c and qkv.rlrr_c.abs().max() > bound_c / 2
    bound_l = math.sqrt(6)  # fan_in = 1: U(±√6)
    assert qkv.rlrr_l.abs().max() <= bound_l and qkv.rlrr_l.abs().max() > bound_l / 2
    assert torch.count_nonzero(qkv.rlrr_s) == 0
    norm1 = model.blocks[0].norm1
    assert isinstance(norm1, SSFLayer) and 0 < (norm1.ssf_scale - 1).abs().max() < 0.2
    assert torch.count_nonzero(model.head.weight) == 0


@torch.no_grad()
def test_reference_init_is_not_identity_and_identity_init_is(make_vit) -> None:
    x = torch.randn(2, 3, 160, 160)
    base = make_vit()
    feats = base.forward_head(base.forward_features(x), pre_logits=True)
    for init, same in (("identity", True), ("reference", False)):
        model = add_rlrr(copy.deepcopy(base), RLRRConfig(init=init), 4).eval()
        got = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(got, feats) is same if init == "identity" else not torch.allclose(got, feats)


@pytest.mark.parametrize("config", [RLRRConfig(init="identity", residual=False),
                                    RLRRConfig(init="identity", left=False),
                                    RLRRConfig.preset("ssf", init="identity")])
@torch.no_grad()
def test_identity_init_for_every_variant(config: RLRRConfig, make_vit) -> None:
    x = torch.randn(2, 3, 160, 160)
    base = make_vit()
    model = add_rlrr(copy.deepcopy(base), config, 4).eval()
    ref = base.forward_head(base.forward_features(x), pre_logits=True)
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), ref)


def test_unsupported_models_are_refused(make_vit) -> None:
    with pytest.raises(ValueError, match="supports timm VisionTransformer"):
        add_rlrr(timm.create_model("resnet18", pretrained=False), RLRRConfig(), 3)
    with pytest.raises(ValueError, match="distilled"):
        add_rlrr(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64), None, 3)
    with pytest.raises(ValueError, match="has no module 'attn.qkvv'"):
        add_rlrr(make_vit(), RLRRConfig(rescale_targets=("attn.qkvv",)), 3)
    model = add_rlrr(make_vit(), RLRRConfig(), 3)
    with pytest.raises(ValueError, match="already has an adapter"):
        add_rlrr(model, RLRRConfig(), 3)


def test_avg_pool_vit_scales_its_fc_norm(make_vit) -> None:
    model = add_rlrr(make_vit("vit_tiny_patch16_224", img_size=64, global_pool="avg", fc_norm=True), None, 3)
    assert isinstance(model.fc_norm, SSFLayer) and isinstance(model.norm, nn.Identity)


def test_adapter_state_dict_holds_adapter_and_head_only(make_vit) -> None:
    model = add_rlrr(make_vit(), RLRRConfig(), 3)
    tensors = adapter_state_dict(model)
    assert sum(t.numel() for t in tensors.values()) == trainable(model)
    assert not any("base_layer" in k for k in tensors)


def test_fingerprint_ignores_head_and_wrappers_but_not_weights(make_vit) -> None:
    base = make_vit()
    fp = backbone_fingerprint(base)
    wrapped = add_rlrr(copy.deepcopy(base), RLRRConfig(), 3)
    assert backbone_fingerprint(wrapped) == fp
    with torch.no_grad():
        base.blocks[1].mlp.fc2.weight[0, 0] += 1e-3
    assert backbone_fingerprint(base) != fp
