"""The lr schedule (warmup from 1e-7, cosine to 1e-8, per iteration) and the AdamW decay groups."""
from __future__ import annotations

import math

import pytest
import timm

from adapters import RLRRConfig, add_rlrr
from trainer.optim import MIN_LR, WARMUP_LR, lr_at, param_groups


def test_warmup_then_cosine_values() -> None:
    total, warmup, peak = 1000, 100, 1e-3
    assert lr_at(0, total, warmup, peak) == WARMUP_LR == 1e-7
    assert lr_at(50, total, warmup, peak) == pytest.approx(1e-7 + (1e-3 - 1e-7) * 0.5)
    assert lr_at(warmup, total, warmup, peak) == pytest.approx(peak)
    # Half-way through the cosine: the mean of peak and floor.
    assert lr_at(550, total, warmup, peak) == pytest.approx((peak + MIN_LR) / 2)
    quarter = MIN_LR + 0.5 * (peak - MIN_LR) * (1 + math.cos(math.pi / 4))
    assert lr_at(325, total, warmup, peak) == pytest.approx(quarter)
    assert lr_at(total, total, warmup, peak) == pytest.approx(MIN_LR, abs=1e-15)
    lrs = [lr_at(i, total, warmup, peak) for i in range(total)]
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1], strict=True))  # strictly rising warmup
    assert all(a >= b for a, b in zip(lrs[warmup:-1], lrs[warmup + 1:], strict=True))  # never rising after


def test_no_warmup() -> None:
    assert lr_at(0, 10, 0, 0.1) == pytest.approx(0.1)


def test_decay_groups_follow_the_recipe() -> None:
    model = add_rlrr(timm.create_model("test_vit", pretrained=False), RLRRConfig(), num_classes=3)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]}
    free = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    # Rescaling vectors and the head weight decay; bias shifts, SSF scale/shift and biases do not.
    assert decayed == {"rlrr_l", "rlrr_c", "weight"}
    assert free == {"rlrr_s", "ssf_scale", "ssf_shift", "bias"}
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())


def test_full_finetuning_groups() -> None:
    model = timm.create_model("test_vit", pretrained=False, num_classes=3)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    free = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= free
    assert all(p.ndim >= 2 for p in decay["params"])
