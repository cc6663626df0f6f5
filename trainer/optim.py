"""The optimizer and its schedule, shared by `train` (adapters) and `pretrain` (the in-house backbone).

AdamW (betas .9/.999, eps 1e-8) with decay only on weight matrices, the head and RLRR's l/c; the lr
is a pure function of the iteration (linear warmup, then cosine), set before each optimizer step.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["WARMUP_LR", "MIN_LR", "lr_at", "param_groups", "adamw", "set_lr"]

WARMUP_LR, MIN_LR = 1e-7, 1e-8


def lr_at(it: int, total: int, warmup: int, peak: float, warmup_lr: float = WARMUP_LR,
          min_lr: float = MIN_LR) -> float:
    """Learning rate at iteration `it`: linear warmup warmup_lr → peak, then cosine peak → min_lr.

    Args:
        it: Iteration (optimizer step) index, from 0.
        total: Iterations in the whole run.
        warmup: Warmup iterations.
        peak: The lr reached at the end of warmup.
        warmup_lr: The lr at iteration 0.
        min_lr: The lr the cosine decays to (reached at `total`).
    """
    if it < warmup:
        return warmup_lr + (peak - warmup_lr) * it / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices, the head and RLRR's l/c; none on biases, shifts,
    SSF scale/shift, norm weights or timm's no_weight_decay() tensors (pos_embed, cls_token).

    Args:
        model: The model; only parameters with requires_grad are included.
        weight_decay: Decay of the decayed group.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        decayed = leaf in ("rlrr_l", "rlrr_c") or (p.ndim >= 2 and name not in skip)
        (decay if decayed else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The recipe's AdamW over `param_groups(model, weight_decay)`.

    Args:
        model: The model whose trainable parameters it steps.
        lr: Initial lr (the schedule sets it before every step anyway).
        weight_decay: Decay of the decayed group.
    """
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr (before a step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
